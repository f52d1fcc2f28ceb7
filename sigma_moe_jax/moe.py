"""The mixture-of-experts block: float32 router, top-k routing, dispatch to SwiGLU experts.

Routing and its statistics run inside `jax.shard_map` over the current mesh, so that the
load-balancing counts can be summed over exactly the mesh axes that split the step's tokens. On
one device the mesh has one device and the code path is the same.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sigma_moe_jax import dispatch as dispatch_lib
from sigma_moe_jax import sharding
from sigma_moe_jax.balancing import MoEStats, layer_statistics
from sigma_moe_jax.layers import normal_param
from sigma_moe_jax.routing import route


class MoE(nnx.Module):
  """Router [d_model, E] plus E SwiGLU experts stacked as [E, d_model, d_ff]."""

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, gate_fn: str,
               renormalize: bool, strategy: str, capacity_factor: Optional[float],
               init_std: float, dtype, rngs: nnx.Rngs, lbl_mode: str = "global",
               top1_lbl_tau: float = 1.0):
    self.gate_fn, self.renormalize = gate_fn, renormalize
    self.strategy, self.capacity_factor, self.dtype = strategy, capacity_factor, dtype
    self.lbl_mode, self.top1_lbl_tau = lbl_mode, top1_lbl_tau
    self.router = normal_param(rngs, (d_model, num_experts), init_std)
    self.w_gate = normal_param(rngs, (num_experts, d_model, d_ff), init_std)
    self.w_up = normal_param(rngs, (num_experts, d_model, d_ff), init_std)
    self.w_down = normal_param(rngs, (num_experts, d_ff, d_model), init_std)

  def __call__(self, x: jax.Array, k: jax.Array, k_max: int, token_mask: jax.Array,
               selection_bias: Optional[jax.Array] = None,
               count_offset: Optional[jax.Array] = None):
    """x [batch, seq, d_model]; k traced int32 scalar <= k_max (static); token_mask [batch, seq];
    selection_bias [E] (loss-free balancing); count_offset [E] (counts carried from earlier
    micro-batches of the same optimizer step).

    Returns (y [batch, seq, d_model], MoEStats).
    """
    batch, seq, d_model = x.shape
    num_experts = self.router.shape[-1]
    zeros = jnp.zeros((num_experts,), jnp.float32)
    bias = zeros if selection_bias is None else selection_bias
    offset = zeros if count_offset is None else count_offset
    mesh = sharding.current_mesh()
    axes = sharding.batch_axes(mesh)

    def route_shard(x, router, k, token_mask, bias, offset):
      # The router runs in float32 whatever the compute dtype: top-1 choices among 96 experts
      # are decided by small logit differences.
      logits = x.astype(jnp.float32) @ router.astype(jnp.float32)  # [b, s, E]
      b, s, _ = logits.shape
      routing = route(logits.reshape(b * s, num_experts), k, k_max, gate_fn=self.gate_fn,
                      renormalize=self.renormalize, token_mask=token_mask.reshape(-1),
                      selection_bias=None if selection_bias is None else bias)
      per_token = lambda a: a.reshape(b, s, k_max)
      ids, weights, valid = map(per_token, (routing.expert_ids, routing.gate_weights,
                                            routing.valid))
      stats = layer_statistics(logits, ids, valid, token_mask, mode=self.lbl_mode,
                               tau=self.top1_lbl_tau, axes=axes,
                               count_offset=None if count_offset is None else offset)
      return ids, weights, valid, stats

    batch_spec = sharding.batch_spec(mesh)
    ids, weights, valid, stats = jax.shard_map(
        route_shard, mesh=mesh,
        in_specs=(batch_spec, P(), P(), batch_spec, P(), P()),
        out_specs=(batch_spec, batch_spec, batch_spec, P()),
    )(x, self.router[...], k, token_mask, bias, offset)

    experts = tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
    flat = lambda a: a.reshape(batch * seq, *a.shape[2:])
    y, dropped = dispatch_lib.dispatch(
        flat(x), flat(ids), flat(weights).astype(self.dtype), flat(valid), experts, k,
        strategy=self.strategy, capacity_factor=self.capacity_factor)
    return y.reshape(batch, seq, d_model), stats._replace(dropped=dropped)
