"""The mixture-of-experts block: float32 router, top-k routing, dispatch to SwiGLU experts.

The whole block runs inside one `jax.shard_map` over the current mesh: tokens split over the
batch axes, experts over `expert`, d_model of the expert weights over `fsdp` (gathered in the
body) and d_ff over `tensor` (partial outputs summed). Load-balancing counts are summed over
exactly the axes that split the step's tokens. On one device the mesh has one device and the
code path is the same.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sigma_moe_jax import dispatch as dispatch_lib
from sigma_moe_jax import sharding
from sigma_moe_jax.balancing import layer_statistics
from sigma_moe_jax.layers import normal_param
from sigma_moe_jax.routing import route

_EXPERT_AXES = {"w_gate": ("expert", "embed", "mlp"), "w_up": ("expert", "embed", "mlp"),
                "w_down": ("expert", "mlp", "embed")}


class MoE(nnx.Module):
  """Router [d_model, E] plus E SwiGLU experts stacked as [E, d_model, d_ff]."""

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, gate_fn: str,
               renormalize: bool, strategy: str, capacity_factor: Optional[float],
               init_std: float, dtype, rngs: nnx.Rngs, lbl_mode: str = "global",
               top1_lbl_tau: float = 1.0, expert_exchange: str = "all_to_all"):
    self.expert_exchange = expert_exchange
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
    num_experts = self.router.shape[-1]
    zeros = jnp.zeros((num_experts,), jnp.float32)
    bias = zeros if selection_bias is None else selection_bias
    offset = zeros if count_offset is None else count_offset
    mesh = sharding.current_mesh()
    axes = sharding.batch_axes(mesh)
    expert_shards = sharding.axis_size(mesh, "expert")
    if num_experts % expert_shards:
      raise ValueError(f"{num_experts} experts do not split over mesh axis expert of size "
                       f"{expert_shards}")
    if (self.expert_exchange == "ragged_all_to_all" and expert_shards > 1
        and jax.default_backend() == "cpu"):
      raise ValueError("expert_exchange='ragged_all_to_all' needs a GPU or TPU: "
                       "jax.lax.ragged_all_to_all does not run on CPU; use 'all_to_all'")
    weights = {name: getattr(self, name)[...] for name in _EXPERT_AXES}
    weight_specs = {name: sharding.logical_spec(_EXPERT_AXES[name], w.shape, mesh)
                    for name, w in weights.items()}

    def moe_shard(x, router, k, token_mask, bias, offset, weights):
      b, s, d_model = x.shape
      # The router runs in float32 whatever the compute dtype: top-1 choices among 96 experts
      # are decided by small logit differences.
      logits = x.astype(jnp.float32) @ router.astype(jnp.float32)  # [b, s, E]
      routing = route(logits.reshape(b * s, num_experts), k, k_max, gate_fn=self.gate_fn,
                      renormalize=self.renormalize, token_mask=token_mask.reshape(-1),
                      selection_bias=None if selection_bias is None else bias)
      stats = layer_statistics(
          logits, routing.expert_ids.reshape(b, s, k_max), routing.valid.reshape(b, s, k_max),
          token_mask, mode=self.lbl_mode, tau=self.top1_lbl_tau, axes=axes,
          count_offset=None if count_offset is None else offset)
      experts = []
      for name in ("w_gate", "w_up", "w_down"):
        w = weights[name]
        for dim, axis in enumerate(weight_specs[name]):
          if axis == "fsdp":  # FSDP: gather d_model before use; the gradient is reduce-scattered
            w = jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True)
        experts.append(w.astype(self.dtype))
      y, dropped = dispatch_lib.dispatch(
          x.reshape(b * s, d_model), routing.expert_ids, routing.gate_weights.astype(self.dtype),
          routing.valid, tuple(experts), k, strategy=self.strategy,
          capacity_factor=self.capacity_factor, expert_axis="expert",
          expert_shards=expert_shards, expert_exchange=self.expert_exchange)
      if weight_specs["w_down"][1] == "tensor":  # d_ff split: partial sums of the down projection
        y = jax.lax.psum(y, "tensor")
      dropped = jax.lax.psum(dropped, axes)
      return y.reshape(b, s, d_model), stats._replace(dropped=dropped)

    batch_spec = sharding.batch_spec(mesh)
    return jax.shard_map(
        moe_shard, mesh=mesh,
        in_specs=(batch_spec, P(), P(), batch_spec, P(), P(), weight_specs),
        out_specs=(batch_spec, P()),
    )(x, self.router[...], k, token_mask, bias, offset, weights)
