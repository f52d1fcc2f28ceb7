"""Resuming a run: the newest intact checkpoint, what must match it, and starting from another
run's checkpoint.

- `restore_latest_intact`: resumes from the newest checkpoint that restores; a damaged one is moved
  to `<workdir>/damaged_checkpoints/` (never deleted) with one line saying so.
- `check_compatible`: the model, the schedule and the data stream must match the checkpoint's.
- `fingerprint`: what the data stream depends on besides the config (the tokenizer's content),
  saved with every checkpoint and compared on resume.
- `restore_initial`: `train.init_from`, another run's checkpoint as this one's start.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional, Tuple

import jax
from jax.experimental import multihost_utils

from sigma_moe_jax.infra import storage
from sigma_moe_jax.training.checkpoint import Checkpointer, abstract_like
from sigma_moe_jax.training.hooks import RunStopped
from sigma_moe_jax.training.run_config import changed_on_new_run, differences
from sigma_moe_jax.training.settings import TrainSettings


def fingerprint(tokenizer_path: str, chat_template_path: str = "") -> dict:
  """sha256 of the tokenizer file, and of the chat template when the run reads conversations:
  the token ids of the data stream depend on both."""
  prints = {"tokenizer_sha256": hashlib.sha256(storage.read_bytes(tokenizer_path)).hexdigest()}
  if chat_template_path:
    prints["chat_template_sha256"] = hashlib.sha256(
        storage.read_bytes(chat_template_path)).hexdigest()
  return prints


def fingerprint_differences(saved: dict, current: dict) -> list:
  """The tokenizer and chat template contents (sha256) that differ, when both configs hold them."""
  diffs = []
  for what in ("tokenizer", "chat_template"):
    saved_hash = saved.get("fingerprint", {}).get(f"{what}_sha256")
    current_hash = current.get("fingerprint", {}).get(f"{what}_sha256")
    if saved_hash and current_hash and saved_hash != current_hash:
      diffs.append(f"{what} content (sha256): checkpoint {saved_hash[:12]}..., config "
                   f"{current_hash[:12]}...")
  return diffs


def check_compatible(saved: dict, current: dict):
  """A resumed run keeps what its checkpoint was made with (`run_config.differences`: the model,
  the schedule, the data stream and batch geometry) and the tokenizer's content."""
  diffs = differences(saved, current, new_run=False) + fingerprint_differences(saved, current)
  if diffs:
    raise ValueError("the workdir holds a checkpoint from an incompatible config ("
                     + "; ".join(diffs) + "); use another --workdir")


def restore_initial(config, t: TrainSettings, state, shardings, train_iter):
  """train.init_from: starts a new run from another run's checkpoint. With init_mode `continue`
  it takes the train state and the data position (the step carries on, so step-keyed schedules
  continue where the other run stood, e.g. a branch under a different top-k schedule); with
  `params` the parameters and the loss-free bias only (fine-tuning, context extension): the
  step, the optimizer and the data start afresh. The model must match, but for its RoPE keys."""
  directory = storage.join(storage.resolve(t.init_from), "checkpoints")
  if not storage.isdir(directory):
    raise ValueError(f"train.init_from: no checkpoints directory in {t.init_from!r}")
  source = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    steps = source.all_steps()
    step = steps[-1] if steps and t.init_step < 0 else t.init_step
    if step not in steps:
      raise ValueError(f"train.init_from: {t.init_from!r} has no checkpoint at step {step} "
                       f"(it has {steps})")
    saved = source.saved_config(step)
    diffs = differences(saved, config.to_dict(), new_run=True)
    rope = changed_on_new_run(saved, config.to_dict(), "model")
    if diffs:
      raise ValueError(f"train.init_from {t.init_from!r} holds a different model ("
                       + "; ".join(diffs) + ")")
    if rope:
      print(f"train.init_from: RoPE changed ({'; '.join(rope)})", flush=True)
    if t.init_mode == "params":
      loaded = source.restore_state(step, abstract_like(state, shardings), params_only=True)
      state = state._replace(params=loaded.params, selection_bias=(
          state.selection_bias if loaded.selection_bias is None else loaded.selection_bias))
    elif source.has_data_position(step):
      state = source.restore(step, abstract_like(state, shardings), train_iter)
    else:  # an imported model: its state, and the data stream from its start
      state = source.restore_state(step, abstract_like(state, shardings))
  finally:
    source.close()
  print(f"initialized from step {step} of {t.init_from}"
        + (" (parameters only)" if t.init_mode == "params" else ""), flush=True)
  return state


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
