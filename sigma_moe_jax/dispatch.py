"""Running the chosen experts: sorted grouped matmul, capacity-padded buffers, dense oracle.

All strategies share one signature:
  strategy(x [tokens, d_model], expert_ids [tokens, slots], gate_weights [tokens, slots],
           valid [tokens, slots], experts, capacity) -> (y [tokens, d_model], dropped int32)
where `experts` = (w_gate [E, d, f], w_up [E, d, f], w_down [E, f, d]).

`dispatch` picks the number of slots from a small static set with `lax.switch`, so a layer built
for k_max = 8 that runs at k = 1 sorts, buffers and multiplies one slot per token, not eight, and
changing k at run time never recompiles.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

Experts = Tuple[jax.Array, jax.Array, jax.Array]


class SortedAssignments(NamedTuple):
  """The (token, slot) assignments of a routing, sorted by expert; masked ones sort last."""

  token: jax.Array  # [n] token index of each sorted row
  expert: jax.Array  # [n] expert of each sorted row (num_experts for masked rows)
  inverse: jax.Array  # [n] sorted row of each assignment in (token, slot) order
  group_sizes: jax.Array  # [E] valid rows per expert
  group_start: jax.Array  # [E] first sorted row of each expert


def sort_assignments(expert_ids, valid, num_experts: int) -> SortedAssignments:
  slots = expert_ids.shape[1]
  flat = jnp.where(valid, expert_ids, num_experts).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  n = flat.shape[0]
  inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  group_start = jnp.cumsum(group_sizes) - group_sizes
  return SortedAssignments((order // slots).astype(jnp.int32), flat[order], inverse,
                           group_sizes, group_start)


def _combine(out_per_assignment, gate_weights):
  """Weighted sum over slots: [tokens * slots, d] x [tokens, slots] -> [tokens, d]."""
  tokens, slots = gate_weights.shape
  out = out_per_assignment.reshape(tokens, slots, -1)
  return jnp.einsum("tsd,ts->td", out, gate_weights.astype(out.dtype))


def ragged(x, expert_ids, gate_weights, valid, experts: Experts, capacity=None):
  """Dropless: sort by expert, grouped matmul with `jax.lax.ragged_dot`, unsort.

  Masked rows sort past the sum of the group sizes, where ragged_dot computes nothing. XLA:CPU
  lowers ragged_dot densely, so this is the GPU/TPU path.
  """
  del capacity
  w_gate, w_up, w_down = experts
  s = sort_assignments(expert_ids, valid, w_gate.shape[0])
  xs = x[s.token]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, s.group_sizes))
  h = h * jax.lax.ragged_dot(xs, w_up, s.group_sizes)
  out = jax.lax.ragged_dot(h, w_down, s.group_sizes)
  return _combine(out[s.inverse], gate_weights), jnp.zeros((), jnp.int32)


def padded(x, expert_ids, gate_weights, valid, experts: Experts, capacity: int):
  """Sort, gather into [experts, capacity, d] buffers, batched matmul, gather back.

  Assignments past an expert's capacity are dropped (their output is zero) and counted. Every
  data movement in the forward pass is a gather.
  """
  w_gate, w_up, w_down = experts
  num_experts = w_gate.shape[0]
  s = sort_assignments(expert_ids, valid, num_experts)
  slot = jnp.arange(capacity, dtype=jnp.int32)
  # Buffer slot (e, c) holds sorted row group_start[e] + c when c < group_sizes[e].
  filled = slot[None, :] < s.group_sizes[:, None]
  source_row = jnp.minimum(s.group_start[:, None] + slot[None, :], s.token.shape[0] - 1)
  buffer = x[s.token[source_row]] * filled[..., None].astype(x.dtype)  # [E, C, d]
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate))
  h = h * jnp.einsum("ecd,edf->ecf", buffer, w_up)
  out = jnp.einsum("ecf,efd->ecd", h, w_down).reshape(num_experts * capacity, -1)
  # Each assignment reads its buffer row back; rows past capacity (and masked rows) read zero.
  row = s.inverse
  expert = s.expert[row]
  position = row - s.group_start[jnp.minimum(expert, num_experts - 1)]
  kept = (expert < num_experts) & (position < capacity)
  buffer_index = jnp.where(kept, expert * capacity + position, 0)
  out = out[buffer_index] * kept[:, None].astype(out.dtype)
  dropped = jnp.sum(valid) - jnp.sum(kept)
  return _combine(out, gate_weights), dropped.astype(jnp.int32)


def dense(x, expert_ids, gate_weights, valid, experts: Experts, capacity=None):
  """Every expert on every token, combined with a masked weight matrix. A test oracle."""
  del capacity
  w_gate, w_up, w_down = experts
  num_experts = w_gate.shape[0]
  weights = jnp.where(valid, gate_weights, 0.0)
  combine = jnp.einsum("tse,ts->te", jax.nn.one_hot(expert_ids, num_experts, dtype=x.dtype),
                       weights.astype(x.dtype))
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
  out = jnp.einsum("tef,efd->ted", h, w_down)
  return jnp.einsum("ted,te->td", out, combine), jnp.zeros((), jnp.int32)


STRATEGIES: Dict[str, Callable] = {"ragged": ragged, "padded": padded, "dense": dense}


def slot_buckets(k_max: int) -> Tuple[int, ...]:
  """Static slot counts compiled for a layer: powers of two below k_max, and k_max."""
  buckets = {k_max}
  b = 1
  while b < k_max:
    buckets.add(b)
    b *= 2
  return tuple(sorted(buckets))


def expert_capacity(tokens: int, slots: int, num_experts: int,
                    capacity_factor: Optional[float]) -> int:
  """Buffer rows per expert. Dropless (None) needs room for every token: top-k experts differ."""
  if capacity_factor is None:
    return tokens
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * slots / num_experts)))


def dispatch(x, expert_ids, gate_weights, valid, experts: Experts, k, *, strategy: str,
             capacity_factor: Optional[float]):
  """Runs the experts for the first k (traced) slots of a routing with k_max static slots."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown dispatch strategy {strategy!r}; expected one of {list(STRATEGIES)}")
  tokens, k_max = expert_ids.shape
  num_experts = experts[0].shape[0]
  buckets = slot_buckets(k_max)

  def run(slots):
    capacity = expert_capacity(tokens, slots, num_experts, capacity_factor)
    return STRATEGIES[strategy](x, expert_ids[:, :slots], gate_weights[:, :slots],
                                valid[:, :slots], experts, capacity)

  if len(buckets) == 1:
    return run(buckets[0])
  index = jnp.searchsorted(jnp.asarray(buckets), k)
  return jax.lax.switch(index, [lambda b=b: run(b) for b in buckets])
