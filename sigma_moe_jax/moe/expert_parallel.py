"""Expert parallelism: experts split over the mesh axis `expert`, tokens sent to them and back
with `jax.lax.all_to_all`. Runs inside the MoE layer's shard_map body.

Each device groups its (token, slot) assignments by the device that holds the expert, into one
fixed-size buffer per destination (capacity from the capacity factor; overflow is dropped and
counted), exchanges buffers with all_to_all, runs its local experts on what it received with the
configured dispatch, and returns the outputs with the reverse all_to_all.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sigma_moe_jax.moe import dispatch as dispatch_lib


def send_capacity(assignments: int, shards: int, capacity_factor: Optional[float]) -> int:
  """Rows per destination buffer. Dropless (None) leaves room for every assignment."""
  return dispatch_lib.buffer_capacity(assignments, shards, capacity_factor, limit=assignments)


def exchange_and_run(x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
                     gate_weights: Float[Array, "T K"], valid: Bool[Array, "T K"],
                     local_experts: dispatch_lib.Experts, *, axis: str, shards: int,
                     num_experts: int, dispatch: Callable,
                     capacity_factor: Optional[float]) -> dispatch_lib.Output:
  """x [tokens, d] local tokens; expert_ids, gate_weights, valid [tokens, slots] (global expert
  ids); local_experts: this device's [num_experts / shards, ...] weights; `dispatch` one of
  `dispatch.DISPATCHES`, run on the received rows.

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
  out, local_dropped = dispatch(
      rows, jnp.minimum(row_expert, local_count - 1), row_valid.astype(x.dtype), row_valid,
      local_experts, local_capacity)
  returned = exchange(out.reshape(shards, capacity, d_model)).reshape(shards * capacity, d_model)
  y = dispatch_lib.combine(dispatch_lib.from_buffers(returned, layout), gate_weights)
  send_dropped = jnp.sum(valid) - jnp.sum(layout.kept)
  return y, (send_dropped + local_dropped).astype(jnp.int32)


def ragged_exchange_and_run(x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
                            gate_weights: Float[Array, "T K"], valid: Bool[Array, "T K"],
                            local_experts: dispatch_lib.Experts, *, axis: str, shards: int,
                            num_experts: int, dispatch: Callable,
                            collective: Optional[Callable] = None) -> dispatch_lib.Output:
  """Dropless expert parallelism with `jax.lax.ragged_all_to_all` (GPU and TPU).

  Each device sends exactly its assignments for each destination; receive buffers are sized for
  the worst case (every assignment of every device to this one). Offsets into remote buffers come
  from one all_gather of the [source, destination] size matrix. `collective` replaces
  ragged_all_to_all (tests use `emulated_ragged_all_to_all` on CPU).
  """
  collective = collective or jax.lax.ragged_all_to_all
  tokens, slots = expert_ids.shape
  assignments, d_model = tokens * slots, x.shape[-1]
  local_count = num_experts // shards
  s = dispatch_lib.sort_assignments(expert_ids // local_count, valid, shards)
  send_rows = x[s.token]  # sorted by destination; masked assignments last, never sent
  send_expert = expert_ids.reshape(-1)[s.order] % local_count
  sizes = jax.lax.all_gather(s.group_sizes, axis)  # [source, destination]
  me = jax.lax.axis_index(axis)
  # Rows from source i land in destination j's buffer after those of sources < i.
  landing = jnp.cumsum(sizes, axis=0) - sizes  # [source, destination]
  # Source i's rows for destination j start at this row of its sorted send buffer.
  start = jnp.cumsum(sizes, axis=1) - sizes  # [source, destination]
  received_rows = shards * assignments
  send = lambda operand, fill: collective(
      operand, jnp.full((received_rows, *operand.shape[1:]), fill, operand.dtype),
      s.group_start, s.group_sizes, landing[me], sizes[:, me], axis_name=axis)
  received, received_expert = send(send_rows, 0), send(send_expert, local_count)
  row_valid = (received_expert < local_count)[:, None]
  out, _ = dispatch(
      received, jnp.minimum(received_expert, local_count - 1)[:, None],
      row_valid.astype(x.dtype), row_valid, local_experts, received_rows)
  returned = collective(out, jnp.zeros((assignments, d_model), out.dtype), landing[:, me],
                        sizes[:, me], start[:, me], sizes[me], axis_name=axis)
  return dispatch_lib.combine(returned[s.inverse], gate_weights), jnp.zeros((), jnp.int32)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """ragged_all_to_all built from all_gather: the same result, for backends without it."""
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  operands = gather(operand)
  first_in, count, first_out = (gather(a)[:, me] for a in (input_offsets, send_sizes,
                                                          output_offsets))
  row = jnp.arange(output.shape[0])[:, None]
  inside = (row >= first_out[None]) & (row < (first_out + count)[None])  # [rows, sources]
  source = jnp.argmax(inside, axis=1)
  source_row = first_in[source] + row[:, 0] - first_out[source]
  rows = operands[source, jnp.clip(source_row, 0, operand.shape[0] - 1)]
  keep = jnp.any(inside, axis=1).reshape(-1, *([1] * (operand.ndim - 1)))
  return jnp.where(keep, rows, output)
