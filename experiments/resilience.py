"""What keeps a run's work safe: preemption, divergence, damaged checkpoints, changed inputs.

- `Preemption`: SIGTERM (a preempted TPU VM, a scheduler) or Ctrl-C sets a flag; the loop stops
  at the next step on which every process agrees, saves there, and exits non-zero.
- `Divergence`: a step with a non-finite loss or gradient norm is never applied (the train step
  skips its update); past `train.max_bad_steps` such steps in a row the run stops without saving.
- `restore_latest_intact`: resumes from the newest checkpoint that restores; a damaged one is moved
  to `<workdir>/damaged_checkpoints/` (never deleted) with one line saying so.
- `fingerprint`: what the data stream depends on besides the config (the tokenizer's content),
  saved with every checkpoint and compared on resume.
"""

from __future__ import annotations

import hashlib
import json
import signal
from typing import Callable, Optional, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from sigma_moe_jax import storage


class RunStopped(Exception):
  """The run stopped before train.steps; the message says why and what was kept.
  `storage_failed`: a background save failed, and the process should exit without waiting for
  the storage layer's other background work (whose teardown would only print noise)."""

  def __init__(self, message: str, storage_failed: bool = False):
    super().__init__(message)
    self.storage_failed = storage_failed


class Preemption:
  """Turns SIGTERM and SIGINT into a flag the training loop polls once per step; a second
  signal interrupts at once (e.g. during a long compilation), losing the steps since the last
  checkpoint."""

  def __init__(self):
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

  def reason(self) -> str:
    return self.signal_name or "a signal to another process of the run"

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Divergence:
  """Counts consecutive steps whose update was skipped as non-finite. Reads each step's flag one
  step late, so the host never waits for the device just to check it."""

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.in_a_row = 0
    self._pending = None

  def observe(self, step: int, metrics) -> None:
    """Checks the previous step's flag, then holds this one's; raises RunStopped past the limit."""
    pending, self._pending = self._pending, (step, metrics["finite"], metrics["loss"],
                                             metrics["grad_norm"])
    if pending is not None:
      self._check(*pending)

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


def fingerprint(tokenizer_path: str, chat_template_path: str = "") -> dict:
  """sha256 of the tokenizer file, and of the chat template when the run reads conversations:
  the token ids of the data stream depend on both."""
  prints = {"tokenizer_sha256": hashlib.sha256(storage.read_bytes(tokenizer_path)).hexdigest()}
  if chat_template_path:
    prints["chat_template_sha256"] = hashlib.sha256(
        storage.read_bytes(chat_template_path)).hexdigest()
  return prints


# Config keys besides the model that a resumed run must share with its checkpoint: they define
# the data stream the saved iterator position refers to.
RESUME_KEYS = (("data", "path"), ("data", "tokenizer"), ("data", "val_fraction"),
               ("data", "seed"), ("data", "order_seed"), ("data", "chunk_chars"),
               ("data", "shard_files"), ("data", "rows_by_path"), ("data", "format"),
               ("data", "chat_template"), ("data", "truncate"),
               ("train", "batch_size"),
               ("train", "seq_len"), ("train", "grad_accum"),
               ("train", "router_lr_scale"))  # 1 or not: the optimizer state's structure


def resume_differences(saved: dict, current: dict) -> list:
  """Data, batch geometry and tokenizer content that differ, as "key: checkpoint x, config y"."""
  diffs = []
  for section, key in RESUME_KEYS:
    if section in saved and key in saved[section] and saved[section][key] != current[section][key]:
      diffs.append(f"{section}.{key}: checkpoint {saved[section][key]!r}, config "
                   f"{current[section][key]!r}")
  for what in ("tokenizer", "chat_template"):
    saved_hash = saved.get("fingerprint", {}).get(f"{what}_sha256")
    current_hash = current.get("fingerprint", {}).get(f"{what}_sha256")
    if saved_hash and current_hash and saved_hash != current_hash:
      diffs.append(f"{what} content (sha256): checkpoint {saved_hash[:12]}..., config "
                   f"{current_hash[:12]}...")
  return diffs


def restore_latest_intact(checkpointer_factory: Callable, workdir: str, restore: Callable,
                          check: Callable) -> Tuple[object, Optional[int], object]:
  """Tries the checkpoints newest first: `check(saved_config)` (a ValueError there is a refusal,
  not damage) then `restore(checkpointer, step)`. A checkpoint that fails to read is moved to
  <workdir>/damaged_checkpoints/<step> and the next older one is tried. Returns (checkpointer,
  step or None when there was none, restored value). Raises RunStopped when checkpoints exist but
  none is intact."""
  checkpointer = checkpointer_factory()
  damaged = []
  while True:
    steps = checkpointer.all_steps()
    if not steps:
      if damaged:
        checkpointer.close()
        raise RunStopped(f"no intact checkpoint: {'; '.join(damaged)}; the damaged ones are in "
                         f"{storage.join(workdir, 'damaged_checkpoints')}")
      return checkpointer, None, None
    step = steps[-1]
    try:
      saved = checkpointer.saved_config(step)
    except Exception as e:  # noqa: BLE001 -- any read failure means this checkpoint is unusable
      saved, error = None, e
    if saved is not None:
      check(saved)  # a different model or data: refused, nothing moved
      try:
        return checkpointer, step, restore(checkpointer, step)
      except Exception as e:  # noqa: BLE001
        error = e
    reason = _one_line(error)
    damaged.append(f"checkpoint {step} is damaged ({reason})")
    checkpointer.close()
    if jax.process_index() == 0:  # the workdir is shared: one process moves, all wait for it
      _move_aside(workdir, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"damaged checkpoint {step} moved")
    checkpointer = checkpointer_factory()
    older = checkpointer.all_steps()
    print(f"checkpoint {step} is damaged ({reason}); "
          + (f"resuming from {older[-1]}" if older else "no older checkpoint"), flush=True)


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  first = next((line for line in text if line.strip()), "")
  return f"{type(error).__name__}: {first[:200]}"


def _move_aside(workdir: str, step: int) -> None:
  source = storage.join(workdir, "checkpoints", str(step))
  target_dir = storage.join(workdir, "damaged_checkpoints")
  storage.makedirs(target_dir)
  target = storage.join(target_dir, str(step))
  suffix = 1
  while storage.exists(target):
    target, suffix = storage.join(target_dir, f"{step}.{suffix}"), suffix + 1
  storage.move(source, target)


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after `step`, which a resumed run writes again."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return
  lines = storage.read_text(path).splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):  # a line cut short by the interruption
      continue
  if len(kept) != len(lines):
    storage.write_text(path, "".join(kept))
