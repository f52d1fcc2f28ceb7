"""The mixture-of-experts block: float32 router, top-k routing, dispatch to SwiGLU experts.

The whole block runs inside one `jax.shard_map` over the current mesh: tokens split over the
batch axes, experts over `expert`, d_model of the expert weights over `fsdp` (gathered in the
body) and d_ff over `tensor` (partial outputs summed). Load-balancing counts are summed over
exactly the axes that split the step's tokens. On one device the mesh has one device and the
code path is the same.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sigma_moe_jax.infra import platform, sharding
from sigma_moe_jax.layers import normal_param
from sigma_moe_jax.moe import dispatch as dispatch_lib
from sigma_moe_jax.moe import expert_parallel
from sigma_moe_jax.moe.balancing import layer_statistics
from sigma_moe_jax.moe.routing import route, router_logits

_EXPERT_AXES = {"w_gate": ("expert", "embed", "mlp"), "w_up": ("expert", "embed", "mlp"),
                "w_down": ("expert", "mlp", "embed")}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """What `MoE` is built from (`ModelConfig.moe_config` derives it; the model's checks apply
  there)."""

  d_model: int
  d_ff: int  # one expert's intermediate size
  num_experts: int
  gate_fn: str = "softmax"  # `softmax` or `sigmoid` scores
  renormalize: bool = False  # the k gate weights rescaled to sum to 1 (never at k = 1)
  dispatch: str = "padded"  # dispatch.DISPATCHES
  capacity_factor: Optional[float] = None  # None: dropless
  init_std: float = 0.0125
  dtype: str = "float32"  # compute dtype; parameters and the router stay float32
  lbl_mode: str = "global"  # balancing.LBL_MODES: the scope of the expert counts
  top1_lbl_tau: float = 1.0
  expert_exchange: str = "all_to_all"  # or `ragged_all_to_all` (GPU / TPU)
  grouped_matmul: str = "auto"  # grouped_matmul.GROUPED_MATMULS


class MoE(nnx.Module):
  """Router [d_model, E] plus E SwiGLU experts stacked as [E, d_model, d_ff]."""

  def __init__(self, cfg: MoEConfig, *args, rngs: nnx.Rngs, **kwargs):
    if not isinstance(cfg, MoEConfig) or args or kwargs:
      raise TypeError("MoE takes its config: MoE(MoEConfig(d_model, d_ff, num_experts, "
                      "gate_fn=..., dispatch=..., ...), rngs=rngs), or "
                      "MoE(model_cfg.moe_config, rngs=rngs)")
    self.cfg = cfg
    self.dtype = jnp.dtype(cfg.dtype)
    init = lambda shape: normal_param(rngs, shape, cfg.init_std)
    self.router = init((cfg.d_model, cfg.num_experts))
    self.w_gate = init((cfg.num_experts, cfg.d_model, cfg.d_ff))
    self.w_up = init((cfg.num_experts, cfg.d_model, cfg.d_ff))
    self.w_down = init((cfg.num_experts, cfg.d_ff, cfg.d_model))

  def _plan(self, mesh):
    """(expert shards, the dispatch that runs) for this mesh and the target compiled for (its
    devices, not the host); errors for what the target cannot run."""
    cfg = self.cfg
    expert_shards = sharding.axis_size(mesh, "expert")
    if cfg.num_experts % expert_shards:
      raise ValueError(f"{cfg.num_experts} experts do not split over mesh axis expert of size "
                       f"{expert_shards}")
    target = platform.current()
    if (cfg.expert_exchange == "ragged_all_to_all" and expert_shards > 1
        and target.platform == "cpu"):
      raise ValueError("expert_exchange='ragged_all_to_all' needs a GPU or TPU: "
                       "jax.lax.ragged_all_to_all does not run on CPU; use 'all_to_all'")
    resolved = dispatch_lib.resolve(cfg.dispatch, cfg.grouped_matmul, target, self.dtype,
                                    cfg.d_model, cfg.d_ff, cfg.capacity_factor)
    return expert_shards, resolved

  def __call__(self, x: jax.Array, top_k: jax.Array, max_top_k: int, token_mask: jax.Array,
               selection_bias: Optional[jax.Array] = None,
               count_offset: Optional[jax.Array] = None):
    """x [batch, seq, d_model]; top_k traced int32 scalar <= max_top_k (static); token_mask
    [batch, seq]; selection_bias [E] (loss-free balancing); count_offset [E] (counts carried from
    earlier micro-batches of the same optimizer step).

    Returns (y [batch, seq, d_model], MoEStats).
    """
    num_experts = self.router.shape[-1]
    zeros = jnp.zeros((num_experts,), jnp.float32)
    bias = zeros if selection_bias is None else selection_bias
    offset = zeros if count_offset is None else count_offset
    mesh = sharding.current_mesh()
    axes = sharding.batch_axes(mesh)
    expert_shards, resolved = self._plan(mesh)
    cfg = self.cfg
    weights = {name: getattr(self, name)[...] for name in _EXPERT_AXES}
    weight_specs = {name: sharding.logical_spec(_EXPERT_AXES[name], w.shape, mesh)
                    for name, w in weights.items()}

    def moe_shard(x, router, top_k, token_mask, bias, offset, weights):
      b, s, d_model = x.shape
      with jax.named_scope("router"):
        logits = router_logits(x, router)  # [b, s, E] float32
        routing = route(logits.reshape(b * s, num_experts), top_k, max_top_k,
                        gate_fn=cfg.gate_fn, renormalize=cfg.renormalize,
                        token_mask=token_mask.reshape(-1),
                        selection_bias=None if selection_bias is None else bias)
      with jax.named_scope("balancing"):
        stats = layer_statistics(
            logits, routing.expert_ids.reshape(b, s, max_top_k),
            routing.valid.reshape(b, s, max_top_k), token_mask, mode=cfg.lbl_mode,
            tau=cfg.top1_lbl_tau, axes=axes,
            count_offset=None if count_offset is None else offset)
      experts = []
      for name in ("w_gate", "w_up", "w_down"):
        w = weights[name]
        for dim, axis in enumerate(weight_specs[name]):
          if axis == "fsdp":  # FSDP: gather d_model before use; the gradient is reduce-scattered
            w = jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True)
        experts.append(w.astype(self.dtype))
      with jax.named_scope("dispatch"):
        y, dropped = run_experts(
            x.reshape(b * s, d_model), routing.expert_ids,
            routing.gate_weights.astype(self.dtype), routing.valid, tuple(experts), top_k,
            dispatch=resolved.run, capacity_factor=resolved.capacity_factor, expert_axis="expert",
            expert_shards=expert_shards, expert_exchange=cfg.expert_exchange)
      if weight_specs["w_down"][1] == "tensor":  # d_ff split: partial sums of the down projection
        y = jax.lax.psum(y, "tensor")
      dropped = jax.lax.psum(dropped, axes)
      return y.reshape(b, s, d_model), stats._replace(
          counts=stats.counts._replace(dropped=dropped))

    batch_spec = sharding.batch_spec(mesh)
    return jax.shard_map(
        moe_shard, mesh=mesh,
        in_specs=(batch_spec, P(), P(), batch_spec, P(), P(), weight_specs),
        out_specs=(batch_spec, P()),
        # Pallas kernels declare no varying mesh axes on their outputs, which the varying-axes
        # check rejects, so it is off around them (the gradients are checked against one device
        # with it off too); elsewhere it stays on: turning it off cost 15% on the CPU.
        check_vma=not resolved.pallas,
    )(x, self.router[...], top_k, token_mask, bias, offset, weights)


def gathered_experts(moe: MoE, x: jax.Array, top_k: jax.Array, max_top_k: int,
                     selection_bias: Optional[jax.Array] = None) -> jax.Array:
  """x [tokens, d_model] -> [tokens, d_model] through the same router and experts as `MoE`, with
  each token's chosen experts' weights gathered for it: dropless and without buffers, so a few
  tokens (a decode step) cost only their own experts. Run outside any shard_map."""
  with jax.named_scope("router"):
    logits = router_logits(x, moe.router[...])
    routing = route(logits, top_k, max_top_k, gate_fn=moe.cfg.gate_fn,
                    renormalize=moe.cfg.renormalize,
                    selection_bias=selection_bias)
  with jax.named_scope("experts"):
    ids = routing.expert_ids  # [tokens, slots]
    w_gate, w_up, w_down = (getattr(moe, name)[...][ids].astype(moe.dtype)
                            for name in ("w_gate", "w_up", "w_down"))
    x = x.astype(moe.dtype)
    h = jax.nn.silu(jnp.einsum("td,tsdf->tsf", x, w_gate)) * jnp.einsum("td,tsdf->tsf", x, w_up)
    out = jnp.einsum("tsf,tsfd->tsd", h, w_down)
    return jnp.einsum("tsd,ts->td", out, routing.gate_weights.astype(out.dtype))


def run_experts(x, expert_ids, gate_weights, valid, experts: dispatch_lib.Experts, top_k, *,
                dispatch: Callable, capacity_factor: Optional[float],
                expert_axis: Optional[str] = None, expert_shards: int = 1,
                expert_exchange: str = "all_to_all"):
  """Runs the experts for the first top_k (traced) slots of a routing with max_top_k static slots.

  With `expert_shards` > 1 (inside a shard_map over `expert_axis`), `experts` are this device's
  share and tokens travel to their experts' devices and back (see expert_parallel.py).
  `dispatch` is one of `dispatch.DISPATCHES` (as `dispatch.resolve` picks it for the target).
  """
  tokens, max_top_k = expert_ids.shape
  num_experts = experts[0].shape[0]
  buckets = dispatch_lib.slot_buckets(max_top_k)

  def run(slots, x, gate_weights, experts, expert_ids, valid):
    ids, weights, mask = expert_ids[:, :slots], gate_weights[:, :slots], valid[:, :slots]
    if expert_shards > 1 and expert_exchange == "ragged_all_to_all":
      return expert_parallel.ragged_exchange_and_run(
          x, ids, weights, mask, experts, axis=expert_axis, shards=expert_shards,
          num_experts=num_experts * expert_shards, dispatch=dispatch)
    if expert_shards > 1:
      return expert_parallel.exchange_and_run(
          x, ids, weights, mask, experts, axis=expert_axis, shards=expert_shards,
          num_experts=num_experts * expert_shards, dispatch=dispatch,
          capacity_factor=capacity_factor)
    capacity = dispatch_lib.expert_capacity(tokens, slots, num_experts, capacity_factor)
    return dispatch(x, ids, weights, mask, experts, capacity)

  if len(buckets) == 1:
    return run(buckets[0], x, gate_weights, experts, expert_ids, valid)
  index = jnp.searchsorted(jnp.asarray(buckets), top_k)
  branches = [functools.partial(run, b) for b in buckets]
  return _switch_recomputing(branches, index, x, gate_weights, experts, expert_ids, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _switch_recomputing(branches, index, x, gate_weights, experts, expert_ids, valid):
  """lax.switch over slot buckets whose backward pass recomputes the chosen branch.

  Differentiating lax.switch directly makes every branch return zero-filled copies of every
  other branch's residuals: at top_k = 1 under max_top_k = 8 that is 14x the top_k = 1 layer's activations
  written each step. Saving only the inputs costs one extra forward of the chosen branch.
  """
  return jax.lax.switch(index, branches, x, gate_weights, experts, expert_ids, valid)


def _switch_fwd(branches, index, x, gate_weights, experts, expert_ids, valid):
  out = _switch_recomputing(branches, index, x, gate_weights, experts, expert_ids, valid)
  return out, (index, x, gate_weights, experts, expert_ids, valid)


def _switch_bwd(branches, residuals, cotangents):
  index, x, gate_weights, experts, expert_ids, valid = residuals
  d_y = cotangents[0]

  def branch_vjp(branch):
    def vjp(x, gate_weights, experts, expert_ids, valid):
      y_of = lambda *args: branch(*args, expert_ids, valid)[0]
      return jax.vjp(y_of, x, gate_weights, experts)[1](d_y)
    return vjp

  d_x, d_gates, d_experts = jax.lax.switch(index, [branch_vjp(b) for b in branches], x,
                                           gate_weights, experts, expert_ids, valid)
  return None, d_x, d_gates, d_experts, None, None


_switch_recomputing.defvjp(_switch_fwd, _switch_bwd)
