"""Dense building blocks: RMSNorm, rotary embeddings and GQA attention with QK-norm."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_moe_jax import attention
from sigma_moe_jax.infra import platform


def normal_param(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, contract: int = 1, out_dtype=None) -> jax.Array:
  """x [..., *k] @ w [*k, *n] -> [..., *n], contracting x's last `contract` dimensions with w's
  first ones; the output in `out_dtype` (default x's dtype), accumulated in float32.

  The weight gradient is formed as rows^T @ dy with the activation's transpose rows^T made
  explicit (and kept so by an optimisation barrier): otherwise XLA:CPU transposes the output
  gradient instead, fused into whatever produced it (a norm's backward, the loss's), which
  writes it in strides and costs more than the matmul it feeds."""
  return _dense(x, w, contract, out_dtype)


def _dense(x, w, contract, out_dtype):
  rows = x.reshape(*x.shape[:x.ndim - contract], -1)
  y = jnp.dot(rows, w.reshape(rows.shape[-1], -1), preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:x.ndim - contract], *w.shape[contract:]).astype(out_dtype or x.dtype)


def _dense_fwd(x, w, contract, out_dtype):
  return _dense(x, w, contract, out_dtype), (x, w)


def _dense_bwd(contract, out_dtype, saved, dy):
  x, w = saved
  k = math.prod(w.shape[:contract])
  rows = x.reshape(-1, k)
  dy_rows = dy.reshape(rows.shape[0], -1).astype(x.dtype)
  w_rows = w.reshape(k, -1).astype(x.dtype)
  d_x = jnp.einsum("tn,kn->tk", dy_rows, w_rows, preferred_element_type=jnp.float32)
  d_w = jnp.dot(jax.lax.optimization_barrier(rows.T), dy_rows, preferred_element_type=jnp.float32)
  return d_x.reshape(x.shape).astype(x.dtype), d_w.reshape(w.shape).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def project(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., d] @ w [d, n] with float32 output: the LM head's matmul (`dense`)."""
  return dense(x, w, 1, jnp.float32)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, normalised in float32 and returned in x's dtype."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    with jax.named_scope("norm"):
      x32 = x.astype(jnp.float32)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      return (y * self.scale[...]).astype(x.dtype)


ROPE_SCALINGS = ("none", "yarn")
# YaRN's ramp between interpolated and kept frequencies, in rotations over the original context
# (the defaults of the YaRN paper and of Hugging Face's implementation).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     original_len: int = 0):
  """(inverse frequencies float32 [head_dim / 2], attention factor) of rotary embeddings.

  `none`: theta ** (-2i / head_dim). `yarn` (Peng et al. 2023, "YaRN"), extending a model
  trained on `original_len` positions by `factor`: dimensions that turn more than
  YARN_BETA_FAST times over the original context keep their frequency, those that turn less
  than YARN_BETA_SLOW times are divided by `factor` (interpolated), with a linear ramp between;
  cos and sin are multiplied by 0.1 ln(factor) + 1. This is the formula of Hugging Face's
  `rope_type: yarn`, so an exported model computes the same rotations.
  """
  half = head_dim // 2
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  if scaling == "none":
    return jnp.asarray(inv_freq, jnp.float32), 1.0
  if scaling != "yarn":
    raise ValueError(f"unknown RoPE scaling {scaling!r}; one of {ROPE_SCALINGS}")

  def dimension(rotations):  # the dimension that turns `rotations` times over original_len
    return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low = max(math.floor(dimension(YARN_BETA_FAST)), 0)
  high = min(math.ceil(dimension(YARN_BETA_SLOW)), head_dim - 1)
  high = high + 0.001 if low == high else high
  interpolated = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)
  inv_freq = inv_freq / factor * interpolated + inv_freq * (1 - interpolated)
  attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
  return jnp.asarray(inv_freq, jnp.float32), attention


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling: str = "none",
               factor: float = 1.0, original_len: int = 0) -> jax.Array:
  """Rotates pairs (i, i + head_dim/2) of x [batch, seq, heads, head_dim] by position
  (frequencies from `rope_frequencies`)."""
  inv_freq, attention = rope_frequencies(x.shape[-1], theta, scaling, factor, original_len)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, half]
  sin = attention * jnp.sin(angles)[:, :, None, :]
  cos = attention * jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its document: restarts at 0 where the segment id changes."""
  seq = segment_ids.shape[1]
  index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  doc_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - doc_start


@dataclasses.dataclass(frozen=True)
class RoPE:
  """Rotary embeddings: base `theta`; `scaling` `yarn` stretches a model trained on
  `original_len` positions by `factor` (`rope_frequencies`)."""

  theta: float = 10_000.0
  scaling: str = "none"
  factor: float = 1.0
  original_len: int = 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """What `Attention` is built from (`ModelConfig.attention_config` derives it; the model's
  checks apply there)."""

  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.0125
  dtype: str = "float32"  # compute dtype; parameters stay float32
  implementation: str = "auto"  # attention.ATTENTIONS
  rope: RoPE = RoPE()
  # The xla path keeps its softmax weights for the backward (`attention.attend`): set for
  # unrolled layers.
  keep_weights: bool = False


class Attention(nnx.Module):
  """Grouped-query attention with per-head RMSNorm on q and k, RoPE, and no biases."""

  def __init__(self, cfg: AttentionConfig, *args, rngs: nnx.Rngs, **kwargs):
    if not isinstance(cfg, AttentionConfig) or args or kwargs:
      raise TypeError("Attention takes its config: Attention(AttentionConfig(d_model, num_heads, "
                      "num_kv_heads, head_dim, qk_norm=..., rope=RoPE(theta=...), ...), "
                      "rngs=rngs), or Attention(model_cfg.attention_config, rngs=rngs)")
    self.cfg = cfg
    self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                        cfg.head_dim)
    self.dtype = jnp.dtype(cfg.dtype)
    init = lambda shape: normal_param(rngs, shape, cfg.init_std)
    self.wq = init((cfg.d_model, cfg.num_heads, cfg.head_dim))
    self.wk = init((cfg.d_model, cfg.num_kv_heads, cfg.head_dim))
    self.wv = init((cfg.d_model, cfg.num_kv_heads, cfg.head_dim))
    self.wo = init((cfg.num_heads, cfg.head_dim, cfg.d_model))
    self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
    self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array):
    """x [batch, seq, d_model]; positions, segment_ids [batch, seq] (packed documents).
    Returns the output [batch, seq, d_model] and the keys and values (what a KV cache holds)."""
    with jax.named_scope("attention"):
      q, k, v = self.project(x, positions)
      impl = attention.resolve(self.cfg.implementation, platform.current(), self.dtype,
                               x.shape[1], self.head_dim)
      return self.output(attention.attend(q, k, v, segment_ids, impl,
                                          self.cfg.keep_weights)), (k, v)

  def project(self, x: jax.Array, positions: jax.Array):
    """q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim], normalised and
    rotated: what attention (or a KV cache) takes."""
    cast = lambda p: p[...].astype(self.dtype)
    q, k, v = (dense(x, cast(w)) for w in (self.wq, self.wk, self.wv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    r = self.cfg.rope
    rope = lambda t: apply_rope(t, positions, r.theta, r.scaling, r.factor, r.original_len)
    return rope(q), rope(k), v

  def output(self, out: jax.Array) -> jax.Array:
    """Attention output [batch, seq, heads, head_dim] -> [batch, seq, d_model]."""
    return dense(out, self.wo[...].astype(self.dtype), contract=2)
