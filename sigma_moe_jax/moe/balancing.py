"""Load balancing: the global-batch LBL (Eq. 1), the Top-1 LBL (Eq. 2), loss-free bias updates,
and the per-layer routing metrics that the paper's figures are made of. See docs/design.md,
"Load balancing".

`layer_statistics` runs inside the MoE layer's `shard_map` body, on the local shard of the batch,
with the names of the mesh axes that split the tokens of the step.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LBL_MODES = ("global", "micro_batch", "sequence")


class RoutingCounts(NamedTuple):
  """Additive routing statistics of one MoE layer: sums over tokens, so the counts of several
  micro-batches, batches or shards combine by a tree sum (`jax.tree.map(jnp.add, a, b)`), and
  every monitored quantity is derived from them (`routing_metrics`, `load_statistics`).

  tokens_per_expert int32 [E]: (token, slot) assignments per expert. gate_prob_sum float32 [E]:
  summed softmax gate probabilities. num_tokens int32: non-padding tokens. dropped int32:
  assignments over capacity. first_choice int32 [E]: tokens whose best-scored expert is each
  expert (slot 0, whatever k): the load the layer would have at top-1. router_z_sum float32:
  summed logsumexp(router logits)^2.
  """

  tokens_per_expert: jax.Array
  gate_prob_sum: jax.Array
  num_tokens: jax.Array
  dropped: jax.Array
  first_choice: jax.Array
  router_z_sum: jax.Array


class MoEStats(NamedTuple):
  """What an MoE layer reports for one step (a leading [layers] axis in the model): its counts
  over the global batch, and the balancing losses of this batch in the configured mode (lbl:
  Eq. 1; top1_lbl: Eq. 2, computed always for monitoring), which are not sums and combine over
  micro-batches by their mean."""

  counts: RoutingCounts
  lbl: jax.Array
  top1_lbl: jax.Array

  @property
  def router_z_loss(self) -> jax.Array:
    """Mean over tokens of logsumexp(router logits)^2 (differentiable: it enters the objective)."""
    return self.counts.router_z_sum / jnp.maximum(self.counts.num_tokens, 1)


# Shapes use the letters of docs/design.md ("Shape letters"): B rows, S positions per row, K
# slots per token, E experts, L leading axes (e.g. layers).
def load_balancing_loss(f: Float[Array, "*L E"],
                        p: Float[Array, "*L E"]) -> Float[Array, "*L"]:
  """Eq. 1: N_E * sum_i f_i p_i over the last axis. 1 at perfect balance."""
  return f.shape[-1] * jnp.sum(f * p, axis=-1)


def top1_load_balancing_loss(fhat: Float[Array, "*L E"],
                             pbar_top1: Float[Array, "*L"]) -> Float[Array, "*L"]:
  """Eq. 2: N_E * sum_i fhat_i^2 / pbar_top1. >= 1; 1 only for one-hot routing, uniform load."""
  return fhat.shape[-1] * jnp.sum(fhat * fhat, axis=-1) / pbar_top1


def _sequence_sums(logits: Float[Array, "B S E"], expert_ids: Int[Array, "B S K"],
                   valid: Bool[Array, "B S K"], token_mask: Bool[Array, "B S"],
                   tau: float) -> Dict[str, jax.Array]:
  """Per-sequence sums [B, ...] over the non-padding tokens: assignment counts [B, E], softmax
  probabilities [B, E], tokens [B], tempered probabilities (fhat) [B, E] and their maxima [B],
  squared logsumexp [B] (the z-loss)."""
  batch, _, num_experts = logits.shape
  mask = token_mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  tempered = jax.nn.softmax(logits / tau, axis=-1)
  flat_ids = jnp.where(valid, expert_ids, num_experts).reshape(batch, -1)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], flat_ids.shape)
  counts = jnp.zeros((batch, num_experts + 1), jnp.float32).at[rows, flat_ids].add(1.0)
  return dict(
      counts=counts[:, :num_experts],
      prob=jnp.sum(probs * mask[..., None], axis=1),
      tokens=jnp.sum(mask, axis=1),
      fhat=jnp.sum(tempered * mask[..., None], axis=1),
      pmax=jnp.sum(jnp.max(tempered, axis=-1) * mask, axis=1),
      z=jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * mask, axis=1))


def layer_statistics(logits: Float[Array, "B S E"], expert_ids: Int[Array, "B S K"],
                     valid: Bool[Array, "B S K"], token_mask: Bool[Array, "B S"], *, mode: str,
                     tau: float, axes: Sequence[str],
                     count_offset: Optional[Float[Array, "E"]] = None) -> MoEStats:
  """Balancing losses and statistics from one shard's routing.

  logits [batch, seq, E] float32; expert_ids, valid [batch, seq, max_top_k]; token_mask [batch, seq].
  Modes (the scope over which f and p are measured):
    global: f from counts summed (psum) over `axes`, i.e. over every token of the step; p the
      mean over the same tokens. Equals the loss of the whole batch on one device.
    micro_batch: each shard's own f and p; the loss is the mean over the shards that hold tokens.
    sequence: f and p per sequence; the loss is the mean over all non-empty sequences of the
      step, whichever shard holds them.
  count_offset [E]: counts added to this step's before f is formed (global and micro_batch),
  used to accumulate counts across gradient-accumulation micro-batches.
  """
  if mode not in LBL_MODES:
    raise ValueError(f"unknown load-balancing mode {mode!r}; expected one of {LBL_MODES}")
  num_experts = logits.shape[-1]
  sums = _sequence_sums(logits, expert_ids, valid, token_mask, tau)
  # Monitoring only (never in a loss): one count over the shard, psum'd once below.
  first_ids = jnp.where(token_mask, expert_ids[..., 0], num_experts).reshape(-1)
  first = jnp.zeros((num_experts + 1,), jnp.float32).at[first_ids].add(1.0)[:num_experts]
  sequence_sums = sums
  if mode != "sequence":
    sums = jax.tree.map(lambda a: jnp.sum(a, axis=0, keepdims=True), sums)
  if mode == "global":
    sums = jax.tree.map(lambda a: jax.lax.psum(a, axes), sums)
  counts = sums["counts"]
  if count_offset is not None:
    if mode == "sequence":
      raise ValueError("count accumulation across micro-batches needs lbl_mode global or "
                       "micro_batch")
    counts = counts + count_offset
  has_tokens = (sums["tokens"] > 0).astype(jnp.float32)
  tokens = jnp.maximum(sums["tokens"], 1.0)[:, None]
  f = jax.lax.stop_gradient(counts / jnp.maximum(jnp.sum(counts, -1, keepdims=True), 1.0))
  p = sums["prob"] / tokens
  fhat = sums["fhat"] / tokens
  pbar = jnp.maximum(sums["pmax"] / tokens[:, 0], 1e-9)
  # The mean over the groups that hold tokens (one in global mode; every shard's or every
  # sequence's otherwise), taken over all shards: groups without tokens count in no mean.
  group_axes = () if mode == "global" else tuple(axes)
  group_mean = lambda v: (jax.lax.psum(jnp.sum(v * has_tokens), group_axes)
                          / jnp.maximum(jax.lax.psum(jnp.sum(has_tokens), group_axes), 1.0))
  lbl = group_mean(load_balancing_loss(f, p))
  top1 = group_mean(top1_load_balancing_loss(fhat, pbar))
  # Monitoring statistics are always over the global batch.
  total = jax.tree.map(lambda a: jax.lax.psum(jnp.sum(a, axis=0), axes), sequence_sums)
  counts = RoutingCounts(
      tokens_per_expert=total["counts"].astype(jnp.int32),
      gate_prob_sum=total["prob"],
      num_tokens=total["tokens"].astype(jnp.int32),
      dropped=jnp.zeros((), jnp.int32),
      first_choice=jax.lax.psum(first, axes).astype(jnp.int32),
      router_z_sum=total["z"])
  return MoEStats(counts, lbl, top1)


# The balancing losses an objective can add, by name (`BalanceSettings.loss`): each maps the
# model's statistics (leading [layers] axis) to one scalar, which the step scales by its `coef`.
# A new loss registers here and is then selectable from the config.
BALANCE_LOSSES: Dict[str, Callable[[MoEStats], jax.Array]] = {
    "lbl": lambda stats: jnp.sum(stats.lbl),  # Eq. 1 in the model's lbl_mode, summed over layers
    "top1_lbl": lambda stats: jnp.sum(stats.top1_lbl),  # Eq. 2, summed over layers
    "none": lambda stats: jnp.zeros((), jnp.float32),
}


def update_selection_bias(bias: Float[Array, "*L E"], tokens_per_expert: Int[Array, "*L E"],
                          rate: float) -> Float[Array, "*L E"]:
  """Loss-free balancing: b_i <- b_i + u * sign(mean load - load_i), per layer.

  bias float32 [layers, E]; tokens_per_expert [layers, E] counted over the global batch.
  """
  load = tokens_per_expert.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def load_statistics(counts: Float[Array, "*L E"],
                    gate_prob_mean: Float[Array, "*L E"]) -> Dict[str, jax.Array]:
  """How balanced a layer is, from its assignment counts and mean gate probabilities [..., E].

  f, p: the load distribution and the mean gate probabilities. load_max_dev / load_min_dev:
  max_i f_i * E - 1 and min_i f_i * E - 1 (Fig. 2a). load_cv / gate_prob_cv: coefficient of
  variation of f and of p across experts: p flat while f is spiky is the "LBL shortcut"
  (Fig. 2b/c). lbl_per_layer: Eq. 1 on exactly these f and p.
  """
  num_experts = counts.shape[-1]
  counts = jnp.asarray(counts, jnp.float32)
  f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  p = jnp.asarray(gate_prob_mean, jnp.float32)
  cv = lambda v: jnp.std(v, axis=-1) * num_experts  # mean of a distribution over E is 1/E
  return {
      "f": f,
      "p": p,
      "load_max_dev": jnp.max(f, axis=-1) * num_experts - 1.0,
      "load_min_dev": jnp.min(f, axis=-1) * num_experts - 1.0,
      "load_cv": cv(f),
      "gate_prob_cv": cv(p),
      "lbl_per_layer": load_balancing_loss(f, p),
  }


def combine_micro_batches(stats: MoEStats) -> MoEStats:
  """One step's statistics from its micro-batches' (leading [micro] axis): the counts summed, the
  losses averaged."""
  return MoEStats(jax.tree.map(lambda a: jnp.sum(a, 0), stats.counts),
                  jnp.mean(stats.lbl, 0), jnp.mean(stats.top1_lbl, 0))


def gate_prob_mean(counts: RoutingCounts) -> jax.Array:
  """Mean softmax gate probability per expert [..., E] over the counted tokens."""
  tokens = jnp.maximum(jnp.asarray(counts.num_tokens, jnp.float32), 1.0)
  return jnp.asarray(counts.gate_prob_sum, jnp.float32) / tokens[..., None]


def routing_metrics(stats: MoEStats) -> Dict[str, jax.Array]:
  """Per-layer monitoring values (each [layers] unless noted; f, p [layers, E]) of one step: the
  `load_statistics` of the step's global batch, with `lbl_per_layer` the loss in the configured
  mode."""
  counts = stats.counts
  assignments = jnp.maximum(jnp.sum(counts.tokens_per_expert, axis=-1), 1).astype(jnp.float32)
  p = gate_prob_mean(counts)
  return {
      **load_statistics(counts.tokens_per_expert, p),
      "lbl_per_layer": stats.lbl,
      "top1_lbl": stats.top1_lbl,
      "router_z_loss": stats.router_z_loss,
      "drop_fraction": counts.dropped.astype(jnp.float32) / assignments,
      # The most loaded expert of the load the layer would have at top-1 (what the adaptive
      # schedule decides on, before its smoothing).
      "first_choice_max_dev": load_statistics(counts.first_choice, p)["load_max_dev"],
  }


def expert_domain_mutual_information(
    counts: Float[Array, "domains *L E"]) -> Float[Array, "*L"]:
  """Mutual information, in bits, between the expert a token is sent to and its domain.

  counts [domains, ..., E]: assignments per expert, counted separately on each domain's text.
  Domains are weighted equally (P(domain) = 1 / domains), so the result does not depend on how
  many tokens each domain contributed; it lies in [0, log2(domains)], 0 when every domain sees
  the same load distribution, log2(domains) when the domains use disjoint experts.
  """
  counts = jnp.asarray(counts, jnp.float32)
  per_domain = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  mixture = jnp.mean(per_domain, axis=0)
  ratio = jnp.where(per_domain > 0, per_domain / jnp.where(mixture > 0, mixture, 1.0), 1.0)
  return jnp.mean(jnp.sum(per_domain * jnp.log2(ratio), axis=-1), axis=0)
