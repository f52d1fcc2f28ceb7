"""Orbax checkpoints: train state, data-iterator state and the run's config, saved together.

Saves are asynchronous; the last `keep` are kept. Restoring takes the abstract train state with
the shardings of the *current* mesh, so a run can resume on a different mesh.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Dict, List, Optional

import grain
import jax
import orbax.checkpoint as ocp

from sigma_moe_jax.infra import storage
from sigma_moe_jax.model import stacked
from sigma_moe_jax.training.step import TrainState


class Checkpointer:
  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(storage.as_epath(directory), options=options)

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def saved_config(self, step: int) -> Dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def save(self, step: int, state: TrainState, iterator: Optional[Any], config: Dict[str, Any],
           force: bool = False) -> bool:
    """Saves when `step` is on the save interval (or `force`); returns whether it did. Block
    parameters held per layer (`model.Layers`, the unrolled layers' train state) are stored
    stacked, as every other run stores them."""
    items = dict(state=ocp.args.StandardSave(stacked(state)._asdict()),
                 config=ocp.args.JsonSave(json.loads(json.dumps(config))))
    if iterator is not None:  # None: a model with no data position (an imported one)
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    return self.manager.save(step, force=force, args=ocp.args.Composite(**items))

  def has_data_position(self, step: int) -> bool:
    return storage.isdir(storage.join(str(self.manager.directory), str(step), "data"))

  def saved_state_fields(self, step: int) -> set:
    """The TrainState fields checkpoint `step` holds (one saved before a field existed lacks
    it)."""
    text = storage.read_text(storage.join(str(self.manager.directory), str(step), "state",
                                          "_METADATA"))
    return {ast.literal_eval(path)[0] for path in json.loads(text)["tree_metadata"]}

  def restore(self, step: int, abstract_state: TrainState, iterator) -> TrainState:
    """Restores the state onto the shardings in `abstract_state` and the iterator in place. A
    field the checkpoint predates (`top_k_state`) comes back as None, for the caller to fill."""
    target = abstract_state._asdict()
    missing = set(target) - self.saved_state_fields(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({k: v for k, v in target.items() if k not in missing}),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return TrainState(**{**dict.fromkeys(missing), **restored["state"]})

  def restore_state(self, step: int, abstract_state: TrainState,
                    params_only: bool = False) -> TrainState:
    """The train state alone: no data iterator is involved. With `params_only` (inference,
    export) the optimizer state is not read, and comes back as None."""
    target = abstract_state._asdict()
    missing = set(target) - self.saved_state_fields(step)
    target = {k: v for k, v in target.items() if k not in missing}
    if not params_only:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      return TrainState(**{**dict.fromkeys(missing), **restored["state"]})
    del target["opt_state"]
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return TrainState(**{**dict.fromkeys(missing), "opt_state": None, **restored["state"]})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(state: TrainState, shardings) -> TrainState:
  """ShapeDtypeStructs of `state` carrying `shardings` (a matching pytree of Shardings)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state, shardings)
