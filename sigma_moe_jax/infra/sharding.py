"""Meshes, the logical-axis rules that place parameters on them, and the batch axes.

Mesh axes: `data` and `fsdp` split the batch (`fsdp` also splits d_model of the weights),
`expert` splits the batch and the experts, `tensor` splits d_ff, heads and the vocabulary.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Every axis that splits the batch. `tensor` splits weights, never tokens.
BATCH_AXES = ("data", "fsdp", "expert")

# Logical dimension -> mesh axis. Dimensions not listed (layers, head_dim, norm scales, the
# router's expert logits) are replicated.
LOGICAL_RULES = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
                 "vocab": "tensor", "expert": "expert"}

# Parameter name -> logical name of each dimension (without the stacked layer axis).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "wq": ("embed", "heads", None),
    "wk": ("embed", "kv_heads", None),
    "wv": ("embed", "kv_heads", None),
    "wo": ("heads", None, "embed"),
    "router": ("embed", None),
    "w_gate": ("expert", "embed", "mlp"),
    "w_up": ("expert", "embed", "mlp"),
    "w_down": ("expert", "mlp", "embed"),
    "scale": (None,),
}


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Optional[Sequence] = None) -> Mesh:
  """A mesh with axes (data, fsdp, expert, tensor); one size may be -1 for the rest."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  for name, size in sizes.items():
    if size != -1 and (not isinstance(size, int) or size < 1):
      raise ValueError(f"mesh axis {name}: must be a positive integer or -1, got {size!r}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh: {len(devices)} devices do not split into {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    needed = math.prod(sizes.values())
    hint = (f"; on CPU, start the process with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
            if devices and devices[0].platform == "cpu" else "")
    raise ValueError(f"mesh: {sizes} needs {needed} devices, have {len(devices)}{hint}")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def current_mesh():
  """The mesh set with `jax.set_mesh`, or a one-device mesh so that there is one code path."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
  return mesh


def axis_size(mesh, name: str) -> int:
  return mesh.shape.get(name, 1)


def batch_axes(mesh) -> Tuple[str, ...]:
  """The mesh axes that split the batch; axes of size 1 are left out (nothing to reduce)."""
  return tuple(name for name in BATCH_AXES
               if name in mesh.axis_names and axis_size(mesh, name) > 1)


def batch_spec(mesh) -> P:
  """PartitionSpec of an array whose leading axis is the batch."""
  axes = batch_axes(mesh)
  return P(axes if axes else None)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation whose leading axis is the batch ([batch, seq, d_model] residual stream) to
  be split over the batch axes of the ambient mesh, replicated along the others; a no-op when no
  mesh is set. Keeps XLA from resharding the residual stream between blocks."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, batch_spec(mesh))


def logical_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh) -> P:
  """Maps logical dimension names to mesh axes. A dimension stays replicated where the axis has
  size 1 (so no collective is spent on it) or does not divide it (2 KV heads on tensor = 4)."""
  axes = []
  for name, size in zip(logical, shape):
    axis = LOGICAL_RULES.get(name) if name else None
    if axis is not None and (axis not in mesh.axis_names or axis_size(mesh, axis) == 1
                             or size % axis_size(mesh, axis)):
      axis = None
    axes.append(axis)
  return P(*axes)


def param_specs(params: Dict, mesh) -> Dict:
  """PartitionSpecs for a model's parameters (a pure dict, leaves arrays or shape structs)."""
  def spec(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    logical = PARAM_AXES.get(names[-1])
    if logical is None:
      raise ValueError(f"no sharding rule for parameter {'/'.join(names)}")
    if names[0] == "blocks":  # stacked layers: leading layer axis, replicated
      logical = (None, *logical)
    if len(logical) != len(leaf.shape):
      raise ValueError(f"sharding rule for {'/'.join(names)} has {len(logical)} dims, the "
                       f"parameter {len(leaf.shape)}")
    return logical_spec(logical, leaf.shape, mesh)
  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Dict, mesh) -> Dict:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh))


def _dict_path(path) -> Tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(state, params_shardings: Dict, mesh):
  """Shardings for a train state: parameters and what mirrors them (AdamW's moments) follow the
  parameter rules; everything else (step counters, the loss-free bias) is replicated."""
  by_path = {_dict_path(path): s for path, s in
             jax.tree_util.tree_leaves_with_path(params_shardings)}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    # Only dict keys are kept, so AdamW's mu["blocks"]["attn"]["wq"] maps to the parameter's.
    found = by_path.get(_dict_path(path))
    return found if found is not None and np.ndim(leaf) == len(found.spec) else replicated
  return jax.tree_util.tree_map_with_path(pick, state)
