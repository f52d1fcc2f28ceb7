"""Which mesh the model runs on, and which of its axes split the tokens of a step."""

from __future__ import annotations

from typing import Tuple

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

# Every axis that splits the batch. `tensor` splits weights, never tokens.
BATCH_AXES = ("data", "fsdp", "expert")


def current_mesh():
  """The mesh set with `jax.set_mesh`, or a one-device mesh so that there is one code path."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))
  return mesh


def batch_axes(mesh) -> Tuple[str, ...]:
  return tuple(name for name in BATCH_AXES if name in mesh.axis_names)


def batch_spec(mesh) -> P:
  """PartitionSpec of an array whose leading axis is the batch."""
  axes = batch_axes(mesh)
  return P(axes if axes else None)
