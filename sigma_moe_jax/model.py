"""The decoder: embedding, a scan over stacked blocks (attention + MoE), final norm, LM head."""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.layers import (Attention, RMSNorm, normal_param, positions_from_segments,
                                  project)
from sigma_moe_jax.moe.layer import MoE, gathered_experts

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class Block(nnx.Module):
  """Pre-norm attention then pre-norm MoE, each with a residual connection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg.attention_config, rngs=rngs)
    self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.moe = MoE(cfg.moe_config, rngs=rngs)

  def __call__(self, x, positions, segment_ids, token_mask, top_k, max_top_k: int,
               selection_bias=None, count_offset=None):
    """(x, MoEStats, (keys, values) of the attention)."""
    attended, kv = self.attn(self.attn_norm(x), positions, segment_ids)
    x = x + attended
    y, stats = self.moe(self.moe_norm(x), top_k, max_top_k, token_mask, selection_bias,
                        count_offset)
    return x + y, stats, kv

  def decode(self, x, positions, cache_k, cache_v, visible, top_k, max_top_k: int,
             selection_bias=None):
    """One token per row (x [batch, 1, d_model] at positions [batch]): writes its keys and
    values into this layer's cache ([batch, max_len, kv_heads, head_dim]) and attends over the
    positions `visible` marks ([batch, 1, 1, max_len]). The MoE runs each token through its own
    experts' weights, gathered for it (`moe.gathered_experts`). Returns (x, (cache_k, cache_v))."""
    rows = jnp.arange(x.shape[0])
    q, k, v = self.attn.project(self.attn_norm(x), positions[:, None])
    cache_k = cache_k.at[rows, positions].set(k[:, 0])
    cache_v = cache_v.at[rows, positions].set(v[:, 0])
    x = x + self.attn.output(jax.nn.dot_product_attention(q, cache_k, cache_v, mask=visible))
    y = gathered_experts(self.moe, self.moe_norm(x)[:, 0], top_k, max_top_k, selection_bias)
    return x + y[:, None].astype(x.dtype), (cache_k, cache_v)


@jax.tree_util.register_pytree_node_class
class Layers:
  """A stacked [layers, ...] parameter (or what mirrors one: a gradient, AdamW's moments) held
  as one array per layer: `Layers(arrays)[i]` is layer i's. The unrolled layers
  (`scan_layers=False`) read each layer's weights as they are, where a stacked array costs a
  slice per layer in the forward and, for its gradient, a stack of zero-padded slices summed in
  the backward; on the CPU that is about 9% of the cpu_tiny step (docs/design.md). Made by
  `unstack_layers`, undone by `stack_layers` (what a checkpoint stores)."""

  def __init__(self, arrays):
    self.arrays = tuple(arrays)

  def __getitem__(self, i):
    return self if i is Ellipsis else self.arrays[i]  # `param[...]` reads the value

  def __len__(self):
    return len(self.arrays)

  def tree_flatten(self):
    return self.arrays, None

  @classmethod
  def tree_unflatten(cls, aux, arrays):
    del aux
    return cls(arrays)


def _is_layers(x) -> bool:
  return isinstance(x, Layers)


def under_blocks(path) -> bool:
  """Whether a pytree path runs through a `blocks` key: the stacked layer parameters, or what
  mirrors them."""
  return any(getattr(k, "key", None) == "blocks" for k in path)


def unstack_layers(tree):
  """Every array under a `blocks` key of `tree` (parameters, a train state: its AdamW moments
  mirror the parameters) split along its leading layer axis into `Layers`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: (Layers([a[i] for i in range(a.shape[0])])
                       if under_blocks(path) and np.ndim(a) else a), tree)


def stack_layers(tree):
  """`unstack_layers` undone: each `Layers` stacked back into one [layers, ...] array."""
  return jax.tree.map(lambda a: jnp.stack(a.arrays) if _is_layers(a) else a, tree,
                      is_leaf=_is_layers)


_stack_layers_compiled = jax.jit(stack_layers)


def stacked(tree):
  """`tree` with any `Layers` stacked, by one compiled program: what a checkpoint stores. Under
  several processes every one calls it, as with any computation on global arrays."""
  return _stack_layers_compiled(tree) if has_layers(tree) else tree


def has_layers(tree) -> bool:
  return any(_is_layers(a) for a in jax.tree.leaves(tree, is_leaf=_is_layers))


def scan_groups(max_top_k_per_layer) -> List[Tuple[int, int, int]]:
  """Runs of consecutive layers sharing a static max_top_k: [(start, stop, max_top_k), ...]."""
  groups, start = [], 0
  for max_top_k, run in itertools.groupby(max_top_k_per_layer):
    length = len(list(run))
    groups.append((start, start + length, max_top_k))
    start += length
  return groups


def check_tokens(tokens, vocab_size: int) -> None:
  """Rejects token ids outside [0, vocab_size) when the ids are concrete (outside jit)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {tokens.min()}, "
                     f"max {tokens.max()}")


class Transformer(nnx.Module):
  """Decoder-only MoE language model. Layer parameters are stacked along a leading layer axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model),
                              cfg.init_std if cfg.embed_init_std is None else cfg.embed_init_std)
    layer_keys = jax.random.split(rngs.params(), cfg.num_layers)
    make_block = lambda key: Block(cfg, rngs=nnx.Rngs(params=key))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_block(layer_keys[0])))
    self.blocks = nnx.merge(graphdef, jax.vmap(lambda key: nnx.state(make_block(key)))(layer_keys))
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.lm_head = normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std)

  def __call__(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None, top_k: Optional[jax.Array] = None,
               selection_bias: Optional[jax.Array] = None,
               count_offset: Optional[jax.Array] = None):
    """Logits for next-token prediction.

    tokens [batch, seq] int32. segment_ids [batch, seq]: packed document ids, 0 for padding
    (default: one document per row); positions restart per document unless given. top_k int32
    [layers]: experts per token in each layer (traced; default: the config's top_k; clipped to
    each layer's static max_top_k). selection_bias float32 [layers, experts]: loss-free balancing.
    count_offset float32 [layers, experts]: expert counts of earlier micro-batches of the same
    optimizer step, added before the load-balancing f is formed.

    Returns (logits float32 [batch, seq, vocab], MoEStats with a leading [layers] axis).
    """
    x, stats = self.hidden_states(tokens, segment_ids, positions, top_k, selection_bias,
                                  count_offset)
    return self.logits(x), stats

  def logits(self, x: jax.Array) -> jax.Array:
    """Final-norm outputs [..., d_model] -> float32 logits [..., vocab] (the LM head)."""
    with jax.named_scope("lm_head"):
      return project(x, self.lm_head[...].astype(x.dtype))

  def scan_layers(self, x, step: Callable, per_layer, remat: str = "none"):
    """Runs `step(block, x, row, max_top_k) -> (x, output)` through the layers: one `lax.scan`
    per run of layers that share a static max top-k (`scan_groups`), or with the config's
    `scan_layers` off, one call per layer. The block parameters may be stacked or `Layers`.
    `per_layer` is a pytree of arrays with a leading [layers] axis (None leaves allowed); `row`
    is its slice for the layer.
    Returns (x, the outputs stacked over all layers). Forward, prefill and decode all run
    through here."""
    graphdef, stacked = nnx.split(self.blocks)
    if self.cfg.scan_layers and has_layers(stacked):  # a scan needs them stacked
      stacked = stack_layers(stacked)
    outputs = []
    for start, stop, max_top_k in scan_groups(self.cfg.max_top_k_per_layer):
      def layer(x, xs, max_top_k=max_top_k):
        layer_state, row = xs
        return step(nnx.merge(graphdef, layer_state), x, row, max_top_k)
      if remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[remat])
      rows = lambda tree: jax.tree.map(lambda a: a[start:stop], tree)
      if self.cfg.scan_layers:
        x, out = jax.lax.scan(layer, x, (rows(stacked), rows(per_layer)))
        outputs.append(out)
        continue
      for i in range(start, stop):
        x, out = layer(x, jax.tree.map(lambda a, i=i: a[i], (stacked, per_layer),
                                       is_leaf=_is_layers))
        outputs.append(jax.tree.map(lambda a: a[None], out))
    return x, jax.tree.map(lambda *s: jnp.concatenate(s), *outputs)

  def hidden_states(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None, top_k: Optional[jax.Array] = None,
                    selection_bias: Optional[jax.Array] = None,
                    count_offset: Optional[jax.Array] = None, return_kv: bool = False):
    """The final-norm output [batch, seq, d_model] (compute dtype) and the MoEStats; arguments
    as in `__call__`. The residual stream is split over the mesh's batch axes at every block
    boundary. With `return_kv`, also every layer's attention keys and values, each
    [layers, batch, seq, kv_heads, head_dim] (prefilling a KV cache)."""
    cfg = self.cfg
    check_tokens(tokens, cfg.vocab_size)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      positions = positions_from_segments(segment_ids)
    max_top_k = np.asarray(cfg.max_top_k_per_layer, np.int32)
    top_k = jnp.full((cfg.num_layers,), cfg.top_k, jnp.int32) if top_k is None else top_k
    top_k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, max_top_k)
    token_mask = segment_ids > 0
    dtype = jnp.dtype(cfg.dtype)

    with jax.named_scope("embed"):
      x = sharding.constrain_batch(jnp.take(self.embed[...], tokens, axis=0).astype(dtype))

    def step(block, x, row, max_top_k):
      layer_top_k, bias, offset = row
      x, stats, kv = block(x, positions, segment_ids, token_mask, layer_top_k, max_top_k, bias,
                           offset)
      return sharding.constrain_batch(x), (stats, kv) if return_kv else stats

    x, outputs = self.scan_layers(x, step, (top_k, selection_bias, count_offset), cfg.remat)
    if return_kv:
      stats, kv = outputs
      return self.final_norm(x), stats, kv
    return self.final_norm(x), outputs
