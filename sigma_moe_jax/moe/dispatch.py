"""Running the chosen experts: sorted grouped matmul, capacity-padded buffers, dense oracle.

Every dispatch shares one signature:
  dispatch(x [tokens, d_model], expert_ids [tokens, slots], gate_weights [tokens, slots],
           valid [tokens, slots], experts, capacity) -> (y [tokens, d_model], dropped int32)
where `experts` = (w_gate [E, d, f], w_up [E, d, f], w_down [E, f, d]).

`moe.run_experts` picks the number of slots (`slot_buckets`: one branch per k up to max_top_k)
with `lax.switch`, so a layer built for max_top_k = 8 that runs at top_k = 1 sorts, buffers and
multiplies one slot per token, not eight, buffers are sized for exactly top_k slots, and changing
top_k at run time never recompiles.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sigma_moe_jax.moe import grouped_matmul as grouped_matmul_lib
from sigma_moe_jax.moe.grouped_matmul import gmm

# Shapes use the letters of docs/design.md ("Shape letters"): T tokens, K slots per token, E
# experts, D d_model, F d_ff, A = T * K assignments, G groups, C capacity per group.
Experts = Tuple[Float[Array, "E D F"], Float[Array, "E D F"], Float[Array, "E F D"]]
Output = Tuple[Float[Array, "T D"], Int[Array, ""]]  # (y, dropped assignments)


class SortedAssignments(NamedTuple):
  """The (token, slot) assignments of a routing, sorted by expert; masked ones sort last."""

  order: jax.Array  # [n] assignment index (token * slots + slot) of each sorted row
  token: jax.Array  # [n] token index of each sorted row
  expert: jax.Array  # [n] expert of each sorted row (num_experts for masked rows)
  inverse: jax.Array  # [n] sorted row of each assignment in (token, slot) order
  group_sizes: jax.Array  # [E] valid rows per expert
  group_start: jax.Array  # [E] first sorted row of each expert


def sort_assignments(expert_ids: Int[Array, "T K"], valid: Bool[Array, "T K"],
                     num_experts: int) -> SortedAssignments:
  slots = expert_ids.shape[1]
  flat = jnp.where(valid, expert_ids, num_experts).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  n = flat.shape[0]
  inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  group_start = jnp.cumsum(group_sizes) - group_sizes
  order = order.astype(jnp.int32)
  return SortedAssignments(order, order // slots, flat[order], inverse,
                           group_sizes, group_start)


def combine(out_per_assignment: Float[Array, "A D"],
            gate_weights: Float[Array, "T K"]) -> Float[Array, "T D"]:
  """Weighted sum over slots: [tokens * slots, d] x [tokens, slots] -> [tokens, d]."""
  tokens, slots = gate_weights.shape
  out = out_per_assignment.reshape(tokens, slots, -1)
  return jnp.einsum("tsd,ts->td", out, gate_weights.astype(out.dtype))


def ragged(x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
           gate_weights: Float[Array, "T K"], valid: Bool[Array, "T K"], experts: Experts,
           capacity: Optional[int] = None, *, backend: str = "xla") -> Output:
  """Dropless: sort by expert, grouped matmul (`grouped_matmul.gmm` with `backend`), unsort.

  Masked rows sort past the sum of the group sizes, where the grouped matmul yields zeros.
  """
  del capacity
  w_gate, w_up, w_down = experts
  s = sort_assignments(expert_ids, valid, w_gate.shape[0])
  xs = x[s.token]
  with jax.named_scope("experts"):
    h = jax.nn.silu(gmm(xs, w_gate, s.group_sizes, backend))
    h = h * gmm(xs, w_up, s.group_sizes, backend)
    out = gmm(h, w_down, s.group_sizes, backend)
  return combine(out[s.inverse], gate_weights), jnp.zeros((), jnp.int32)


@jax.custom_vjp
def take_rows(values, index, mask, readers, readers_mask):
  """rows[i] = values[index[i]] where mask[i], else 0: a gather whose gradient is a gather too.

  `readers` [len(values), g] lists, for each row j of `values`, the rows i that read it (where
  `readers_mask`), so d values[j] = sum of d rows[readers[j]]. Dispatch and combine are
  permutations with at most `slots` readers per row; a gather is much cheaper than the scatter-add
  that autodiff would emit.
  """
  return jnp.where(mask[:, None], values[index], 0)


def _take_rows_fwd(values, index, mask, readers, readers_mask):
  return take_rows(values, index, mask, readers, readers_mask), (readers, readers_mask)


def _take_rows_bwd(residuals, d_rows):
  readers, readers_mask = residuals
  d_values = jnp.sum(jnp.where(readers_mask[..., None], d_rows[readers], 0), axis=1)
  return d_values, None, None, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class BufferLayout(NamedTuple):
  """Where each (token, slot) assignment sits in fixed-size per-group buffers [groups, capacity].

  source [groups * capacity]: assignment (token * slots + slot) feeding each buffer row;
  filled [groups * capacity]: the row holds an assignment; index [assignments]: the buffer row of
  each assignment; kept [assignments]: it got a row (valid and within capacity). Each group keeps
  its first `capacity` assignments in (token, slot) order.
  """

  source: jax.Array
  filled: jax.Array
  index: jax.Array
  kept: jax.Array


def buffer_layout(group_ids: Int[Array, "T K"], valid: Bool[Array, "T K"], num_groups: int,
                  capacity: int) -> BufferLayout:
  s = sort_assignments(group_ids, valid, num_groups)
  position = jnp.arange(capacity, dtype=jnp.int32)
  filled = (position[None, :] < s.group_sizes[:, None]).reshape(-1)
  source_row = jnp.minimum(s.group_start[:, None] + position[None, :], s.order.shape[0] - 1)
  source = s.order[source_row].reshape(-1)
  row = s.inverse
  group = s.expert[row]
  rank = row - s.group_start[jnp.minimum(group, num_groups - 1)]
  kept = (group < num_groups) & (rank < capacity)
  index = jnp.where(kept, group * capacity + rank, 0)
  return BufferLayout(source, filled, index, kept)


def to_buffers(x: Float[Array, "T D"], layout: BufferLayout,
               slots: int) -> Float[Array, "G*C D"]:
  """Token rows x [tokens, d] -> buffer rows [groups * capacity, d] (empty rows are zero)."""
  tokens = x.shape[0]
  return take_rows(x, layout.source // slots, layout.filled,
                   layout.index.reshape(tokens, slots), layout.kept.reshape(tokens, slots))


def from_buffers(rows: Float[Array, "G*C D"], layout: BufferLayout) -> Float[Array, "A D"]:
  """Buffer rows [groups * capacity, d] -> one row per assignment (zero where not kept)."""
  return take_rows(rows, layout.index, layout.kept, layout.source[:, None],
                   layout.filled[:, None])


def padded(x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
           gate_weights: Float[Array, "T K"], valid: Bool[Array, "T K"], experts: Experts,
           capacity: int) -> Output:
  """Sort, gather into [experts, capacity, d] buffers, batched matmul, gather back.

  Assignments past an expert's capacity are dropped (their output is zero) and counted. Data
  moves by gathers only, forward and backward.
  """
  w_gate, w_up, w_down = experts
  num_experts = w_gate.shape[0]
  layout = buffer_layout(expert_ids, valid, num_experts, capacity)
  buffer = to_buffers(x, layout, expert_ids.shape[1]).reshape(num_experts, capacity, -1)
  with jax.named_scope("experts"):
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", h, w_down).reshape(num_experts * capacity, -1)
  dropped = jnp.sum(valid) - jnp.sum(layout.kept)
  return combine(from_buffers(out, layout), gate_weights), dropped.astype(jnp.int32)


def dense(x: Float[Array, "T D"], expert_ids: Int[Array, "T K"],
          gate_weights: Float[Array, "T K"], valid: Bool[Array, "T K"], experts: Experts,
          capacity: Optional[int] = None) -> Output:
  """Every expert on every token, combined with a masked weight matrix. A test oracle."""
  del capacity
  w_gate, w_up, w_down = experts
  num_experts = w_gate.shape[0]
  weights = jnp.where(valid, gate_weights, 0.0)
  per_expert = jnp.einsum("tse,ts->te", jax.nn.one_hot(expert_ids, num_experts, dtype=x.dtype),
                          weights.astype(x.dtype))
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate)) * jnp.einsum("td,edf->tef", x, w_up)
  out = jnp.einsum("tef,efd->ted", h, w_down)
  return jnp.einsum("ted,te->td", out, per_expert), jnp.zeros((), jnp.int32)


DISPATCHES: Dict[str, Callable] = {"ragged": ragged, "padded": padded, "dense": dense}
# Capacity of the padded dispatch where `ragged` finds no grouped-matmul kernel (a GPU other
# than Hopper) and the model is dropless: dropless buffers would cost as much as the dense path.
FALLBACK_CAPACITY_FACTOR = 2.0


class Resolved(NamedTuple):
  """What a layer runs on the target: the dispatch function, its capacity factor, and whether a
  Pallas kernel is inside (shard_map's varying-axes check cannot see through those)."""

  run: Callable
  capacity_factor: Optional[float]
  pallas: bool = False


def resolve(dispatch: str, grouped_matmul: str, target, dtype, d_model: int, d_ff: int,
            capacity_factor: Optional[float]) -> Resolved:
  """The dispatch a layer configured with (`dispatch`, `grouped_matmul`) runs on `target`."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"unknown dispatch {dispatch!r}; expected one of {list(DISPATCHES)}")
  if dispatch != "ragged":
    return Resolved(DISPATCHES[dispatch], capacity_factor)
  backend = grouped_matmul_lib.resolve(grouped_matmul, target, dtype, d_model, d_ff)
  if backend is None:
    return Resolved(padded, capacity_factor or FALLBACK_CAPACITY_FACTOR)
  return Resolved(functools.partial(ragged, backend=backend), capacity_factor,
                  pallas=backend in ("megablox", "mosaic_gpu", "triton"))


def slot_buckets(max_top_k: int) -> Tuple[int, ...]:
  """Static slot counts compiled for a layer: every k from 1 to max_top_k. A branch shared by
  several k (k = 3 run with 4 slots) would size its buffers for the larger k, and so drop fewer
  assignments than the capacity factor says."""
  return tuple(range(1, max_top_k + 1))


def buffer_capacity(rows: int, groups: int, capacity_factor: Optional[float], limit: int) -> int:
  """Rows per buffer when `rows` assignments are spread over `groups` fixed-size buffers:
  capacity_factor times the even share, at most `limit` (what one group can ever receive).
  None is dropless: room for `limit` rows."""
  if capacity_factor is None:
    return limit
  return max(1, min(limit, math.ceil(capacity_factor * rows / groups)))


def expert_capacity(tokens: int, slots: int, num_experts: int,
                    capacity_factor: Optional[float]) -> int:
  """Buffer rows per expert. An expert gets at most one slot of each token (top-k experts are
  distinct), so dropless needs room for every token."""
  return buffer_capacity(tokens * slots, num_experts, capacity_factor, limit=tokens)
