"""The hooks a training run is made of; `fit` calls them after each step.

- `Divergence`: a step with a non-finite loss or gradient norm is never applied (the train step
  skips its update); past `max_bad_steps` such steps in a row the run stops without saving.
- `ThroughputLog`: every `every` steps the step's metrics, tokens/s, MFU and the ETA.
- `Evaluate`: every `every` steps a function of the state that returns values and a text.
- `WriteMetrics`: writes what the hooks before it recorded (console, metrics.jsonl, TensorBoard).
- `Checkpoints`: saves every `every` steps and at the end.
- `Preemption`: SIGTERM (a preempted TPU VM, a scheduler) or Ctrl-C sets a flag; the loop stops at
  the next step on which every process agrees, saves there, and stops with `RunStopped`.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from sigma_moe_jax.infra import storage
from sigma_moe_jax.infra.metrics import format_duration
from sigma_moe_jax.training.loop import Hook, StepEnd


class RunStopped(Exception):
  """The run stopped before its last step; the message says why and what was kept.
  `storage_failed`: a background save failed, and the process should exit without waiting for
  the storage layer's other background work (whose teardown would only print noise)."""

  def __init__(self, message: str, storage_failed: bool = False):
    super().__init__(message)
    self.storage_failed = storage_failed


def short_reason(error: Exception) -> str:
  """A storage error in a few words: the OS's reason when there is one (storage layers wrap it
  in long messages)."""
  text = " ".join(str(error).split())
  for reason in ("No space left on device", "Permission denied", "Read-only file system",
                 "Disk quota exceeded"):
    if reason in text:
      return reason
  return f"{type(error).__name__}: {text[:160]}"


class Divergence(Hook):
  """Counts consecutive steps whose update was skipped as non-finite. Reads each step's flag one
  step late, so the host never waits for the device just to check it; `flush` checks the
  pending one (before a save: a step whose check is pending is never saved)."""

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.in_a_row = 0
    self._pending = None

  def after_step(self, end: StepEnd) -> None:
    m = end.metrics
    pending, self._pending = self._pending, (end.step, m["finite"], m["loss"], m["grad_norm"])
    if pending is not None:
      self._check(*pending)

  def at_end(self, end: StepEnd) -> None:
    self.flush()

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._check(*pending)

  def _check(self, step, finite, loss, grad_norm):
    if bool(finite):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    print(f"step {step}: non-finite loss {float(loss)} or gradient norm {float(grad_norm)}; "
          f"the update was skipped ({self.in_a_row} in a row)", flush=True)
    if self.in_a_row > self.max_bad_steps:
      raise RunStopped(
          f"training diverged: non-finite loss or gradient norm at step {step} "
          f"({self.in_a_row} step(s) in a row, train.max_bad_steps={self.max_bad_steps}); no "
          f"non-finite update was applied or saved, the checkpoints are as they were")


class ThroughputLog(Hook):
  """Every `every` steps (and the last): the step's metrics, tokens/s, MFU and the ETA, recorded
  and summarised on the console line. Rates count from the end of the first step, which
  includes the compilation. `flops_per_token(top_k)` gives the model FLOPs of a token at the
  step's per-layer top-k; `peak_flops` is the peak of all devices together."""

  def __init__(self, every: int, tokens_per_step: int, flops_per_token: Callable,
               peak_flops: float):
    self.every, self.tokens_per_step = every, tokens_per_step
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.first = None  # (step, time) at the end of the first step
    self.last = None  # (step, time) of the last line

  def after_step(self, end: StepEnd) -> None:
    if self.first is None:
      jax.block_until_ready(end.metrics)
      self.first = self.last = (end.step, time.perf_counter())
    if not end.every(self.every):
      return
    metrics = jax.device_get(end.metrics)
    now = time.perf_counter()
    steps, seconds = end.step - self.last[0], now - self.last[1]
    if steps == 0:  # the first step is the line: its rate includes the compilation
      steps = 1
    tokens_per_sec = steps * self.tokens_per_step / max(seconds, 1e-9)
    mfu = tokens_per_sec * self.flops_per_token(metrics["top_k"]) / self.peak_flops
    done = end.step - self.first[0]
    eta = (end.until - end.step) * (now - self.first[1]) / done if done else None
    self.last = (end.step, now)
    end.log({**metrics, "tokens_per_sec": tokens_per_sec, "mfu": mfu},
            f"loss {metrics['loss']:.4f} | lm {metrics['lm_loss']:.4f} | lbl "
            f"{metrics['lbl']:.4f} | lr {metrics['lr']:.2e} | gnorm {metrics['grad_norm']:.3f} | "
            f"{tokens_per_sec:,.0f} tok/s | MFU {mfu:.1%} | max load L0 "
            f"{metrics['load_max_dev'][0]:+.2f} | dropped {np.max(metrics['drop_fraction']):.1%} "
            f"(worst layer) | ETA {format_duration(eta) if eta is not None else '-'}")


class Evaluate(Hook):
  """Every `every` steps (and the last): `evaluate(state) -> (values, text)` recorded and added
  to the console line."""

  def __init__(self, every: int, evaluate: Callable):
    self.every, self.evaluate = every, evaluate

  def after_step(self, end: StepEnd) -> None:
    if end.every(self.every):
      values, text = self.evaluate(end.state)
      end.log(values, text)


class WriteMetrics(Hook):
  """Writes each step's record with its console line ("step N/M | ..."), through a writer with
  `write(step, values, line)`, `flush()` and `close()` (`infra.metrics.MetricsWriter`).
  A failed write (a full disk) stops the run with one line; `last_saved()` names the newest
  complete checkpoint in it."""

  def __init__(self, writer, last_saved: Callable[[], object] = lambda: "none"):
    self.writer, self.last_saved = writer, last_saved
    self.step = 0

  def after_step(self, end: StepEnd) -> None:
    self.step = end.step
    if end.record:
      try:
        self.writer.write(end.step, end.record,
                          " | ".join([f"step {end.step}/{end.until}"] + end.line))
      except OSError as e:
        raise self.failed(e) from None

  def flush(self) -> None:
    self.writer.flush()

  def failed(self, error: Exception) -> RunStopped:
    return RunStopped(f"writing the metrics failed by step {self.step} ({short_reason(error)}); "
                      f"the last complete checkpoint is {self.last_saved()}",
                      storage_failed=True)

  def close(self, error: Optional[BaseException]) -> None:
    try:
      self.writer.close()
    except OSError as e:
      if error is None:  # a run already stopping keeps its own reason
        raise self.failed(e) from None


class Checkpoints(Hook):
  """Saves the state and the data iterator's position every `every` steps and at the end (then
  waits for the write), after calling each of `before_save` (a pending divergence check, the
  metrics flush: metrics reach storage no later than the checkpoint that covers them). A failed
  save (a full disk) stops the run with one line naming the last complete checkpoint: Orbax
  writes into a temporary directory, so earlier checkpoints stay intact."""

  def __init__(self, checkpointer, every: int, iterator, config: dict,
               before_save: Sequence[Callable] = (), last_saved: int = 0):
    self.checkpointer, self.every, self.iterator, self.config = (checkpointer, every, iterator,
                                                                 config)
    self.before_save, self.last_saved = list(before_save), last_saved

  def after_step(self, end: StepEnd) -> None:
    if end.step % self.every == 0:
      self.save(end.step, end.state)

  def at_end(self, end: StepEnd) -> None:
    self.save(end.step, end.state, force=True, wait=True)

  def save(self, step: int, state, force: bool = False, wait: bool = False) -> None:
    for call in self.before_save:
      call()
    try:
      if step != self.last_saved:
        self.checkpointer.save(step, state, self.iterator, self.config, force=force)
        self.last_saved = step
      if wait:
        self.checkpointer.wait()
    except Exception as e:  # noqa: BLE001 -- whatever the storage raised, stop with one line
      # The failed background writes are not logged again when their tasks are collected.
      logging.getLogger("asyncio").setLevel(logging.CRITICAL)
      # With asynchronous saves the failure may be an earlier save's, reported here.
      raise RunStopped(f"a checkpoint save failed by step {step} ({short_reason(e)}); the last "
                       f"complete checkpoint is {self.completed_step()}",
                       storage_failed=True) from None

  def completed_step(self):
    """The newest checkpoint directory that Orbax finished (it renames one when it is whole)."""
    directory = self.checkpointer.directory
    steps = sorted(int(d) for d in storage.listdir(directory) if d.isdigit())
    return steps[-1] if steps else "none"

  def close(self, error: Optional[BaseException]) -> None:
    # After a failed save, closing the checkpointer would wait on the storage layer's pending
    # writes, whose callbacks then fail noisily; the process exits instead (cli/train.py).
    if not (isinstance(error, RunStopped) and error.storage_failed):
      self.checkpointer.close()


class Preemption(Hook):
  """Turns SIGTERM and SIGINT into a flag polled once per step; at the first step where any
  process was signalled, saves through `checkpoints` and stops. A second signal interrupts at
  once (e.g. during a long compilation), losing the steps since the last checkpoint."""

  def __init__(self, checkpoints: Checkpoints):
    self.checkpoints = checkpoints
    self.signal_name: Optional[str] = None
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:  # a second signal: stop now, without saving
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    """Whether any process was signalled. Every process calls this at the same step; with
    several processes they agree through one small all-gather, so all stop at the same step."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def after_step(self, end: StepEnd) -> None:
    if end.step < end.until and self.requested():
      self.checkpoints.save(end.step, end.state, force=True, wait=True)
      reason = self.signal_name or "a signal to another process of the run"
      raise RunStopped(f"stopped by {reason} at step {end.step}; checkpoint {end.step} saved, "
                       f"run the same command to resume")

  def close(self, error: Optional[BaseException]) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
