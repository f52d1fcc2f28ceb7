"""The mixture-of-experts block: float32 router, top-k routing, dispatch to SwiGLU experts."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sigma_moe_jax import dispatch as dispatch_lib
from sigma_moe_jax.layers import normal_param
from sigma_moe_jax.routing import Routing, route, tokens_per_expert


class MoEStats(NamedTuple):
  """What load balancing and monitoring need from one MoE layer, over its local tokens.

  tokens_per_expert int32 [E]: valid (token, slot) assignments per expert, before drops.
  gate_prob_mean float32 [E]: mean softmax gate probability over non-padding tokens
    (differentiable: the `p` of the load-balancing loss).
  num_tokens int32: non-padding tokens routed. dropped int32: assignments over capacity.
  """

  tokens_per_expert: jax.Array
  gate_prob_mean: jax.Array
  num_tokens: jax.Array
  dropped: jax.Array


def routing_stats(routing: Routing, token_mask: jax.Array, dropped: jax.Array) -> MoEStats:
  num_experts = routing.gate_probs.shape[-1]
  num_tokens = jnp.sum(token_mask.astype(jnp.int32))
  prob_sum = jnp.sum(routing.gate_probs * token_mask[:, None], axis=0)
  return MoEStats(
      tokens_per_expert=tokens_per_expert(routing.expert_ids, routing.valid, num_experts),
      gate_prob_mean=prob_sum / jnp.maximum(num_tokens, 1),
      num_tokens=num_tokens,
      dropped=dropped)


class MoE(nnx.Module):
  """Router [d_model, E] plus E SwiGLU experts stacked as [E, d_model, d_ff]."""

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, gate_fn: str,
               renormalize: bool, strategy: str, capacity_factor: Optional[float],
               init_std: float, dtype, rngs: nnx.Rngs):
    self.gate_fn, self.renormalize = gate_fn, renormalize
    self.strategy, self.capacity_factor, self.dtype = strategy, capacity_factor, dtype
    self.router = normal_param(rngs, (d_model, num_experts), init_std)
    self.w_gate = normal_param(rngs, (num_experts, d_model, d_ff), init_std)
    self.w_up = normal_param(rngs, (num_experts, d_model, d_ff), init_std)
    self.w_down = normal_param(rngs, (num_experts, d_ff, d_model), init_std)

  def __call__(self, x: jax.Array, k: jax.Array, k_max: int, token_mask: jax.Array,
               selection_bias: Optional[jax.Array] = None):
    """x [batch, seq, d_model]; k traced int32 scalar <= k_max (static); token_mask [batch, seq].

    Returns (y [batch, seq, d_model], MoEStats).
    """
    batch, seq, d_model = x.shape
    tokens = x.reshape(batch * seq, d_model)
    mask = token_mask.reshape(-1)
    # The router runs in float32 whatever the compute dtype: top-1 choices among 96 experts are
    # decided by small logit differences.
    logits = tokens.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
    routing = route(logits, k, k_max, gate_fn=self.gate_fn, renormalize=self.renormalize,
                    token_mask=mask, selection_bias=selection_bias)
    experts = tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    y, dropped = dispatch_lib.dispatch(
        tokens, routing.expert_ids, routing.gate_weights.astype(self.dtype), routing.valid,
        experts, k, strategy=self.strategy, capacity_factor=self.capacity_factor)
    return y.reshape(batch, seq, d_model), routing_stats(routing, mask, dropped)
