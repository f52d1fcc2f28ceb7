"""Expert parallelism: experts split over the mesh axis `expert`, tokens sent to them and back
with `jax.lax.all_to_all`. Runs inside the MoE layer's shard_map body.

Each device groups its (token, slot) assignments by the device that holds the expert, into one
fixed-size buffer per destination (capacity from the capacity factor; overflow is dropped and
counted), exchanges buffers with all_to_all, runs its local experts on what it received with the
configured strategy, and returns the outputs with the reverse all_to_all.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from sigma_moe_jax import dispatch as dispatch_lib


def send_capacity(assignments: int, shards: int, capacity_factor: Optional[float]) -> int:
  """Rows per destination buffer. Dropless (None) leaves room for every assignment."""
  if capacity_factor is None:
    return assignments
  return max(1, min(assignments, math.ceil(capacity_factor * assignments / shards)))


def exchange_and_run(x, expert_ids, gate_weights, valid, local_experts, *, axis: str,
                     shards: int, num_experts: int, strategy: str,
                     capacity_factor: Optional[float]):
  """x [tokens, d] local tokens; expert_ids, gate_weights, valid [tokens, slots] (global expert
  ids); local_experts: this device's [num_experts / shards, ...] weights.

  Returns (y [tokens, d], dropped int32 on this device).
  """
  tokens, slots = expert_ids.shape
  d_model = x.shape[-1]
  local_count = num_experts // shards
  capacity = send_capacity(tokens * slots, shards, capacity_factor)
  destination = expert_ids // local_count
  layout = dispatch_lib.buffer_layout(destination, valid, shards, capacity)
  send = dispatch_lib.to_buffers(x, layout, slots).reshape(shards, capacity, d_model)
  send_expert = jnp.where(layout.filled, expert_ids.reshape(-1)[layout.source] % local_count,
                          local_count).reshape(shards, capacity)
  exchange = lambda a: jax.lax.all_to_all(a, axis, 0, 0)
  received, received_expert = exchange(send), exchange(send_expert)
  # Every received row is one assignment to one local expert: one slot per row, gate weight 1
  # (the source applies the real gate weight when the result comes back).
  rows = received.reshape(shards * capacity, d_model)
  row_expert = received_expert.reshape(-1, 1)
  row_valid = row_expert < local_count
  local_capacity = dispatch_lib.expert_capacity(tokens * shards, slots, num_experts,
                                                capacity_factor)
  local_capacity = min(local_capacity, shards * capacity)
  out, local_dropped = dispatch_lib.STRATEGIES[strategy](
      rows, jnp.minimum(row_expert, local_count - 1), row_valid.astype(x.dtype), row_valid,
      local_experts, local_capacity)
  returned = exchange(out.reshape(shards, capacity, d_model)).reshape(shards * capacity, d_model)
  y = dispatch_lib.combine(dispatch_lib.from_buffers(returned, layout), gate_weights)
  send_dropped = jnp.sum(valid) - jnp.sum(layout.kept)
  return y, (send_dropped + local_dropped).astype(jnp.int32)
