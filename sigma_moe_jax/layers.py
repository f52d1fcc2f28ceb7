"""Dense building blocks: RMSNorm, rotary embeddings and GQA attention with QK-norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sigma_moe_jax import attention, platform


def normal_param(rngs: nnx.Rngs, shape, std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, normalised in float32 and returned in x's dtype."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + head_dim/2) of x [batch, seq, heads, head_dim] by position."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
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


class Attention(nnx.Module):
  """Grouped-query attention with per-head RMSNorm on q and k, RoPE, and no biases."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               qk_norm: bool, rope_theta: float, norm_eps: float, init_std: float,
               dtype, rngs: nnx.Rngs, implementation: str = "auto"):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta, self.dtype, self.implementation = rope_theta, dtype, implementation
    self.wq = normal_param(rngs, (d_model, num_heads, head_dim), init_std)
    self.wk = normal_param(rngs, (d_model, num_kv_heads, head_dim), init_std)
    self.wv = normal_param(rngs, (d_model, num_kv_heads, head_dim), init_std)
    self.wo = normal_param(rngs, (num_heads, head_dim, d_model), init_std)
    self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array):
    """x [batch, seq, d_model]; positions, segment_ids [batch, seq] (packed documents).
    Returns the output [batch, seq, d_model] and the keys and values (what a KV cache holds)."""
    with jax.named_scope("attention"):
      q, k, v = self.project(x, positions)
      impl = attention.resolve(self.implementation, platform.current(), self.dtype, x.shape[1],
                               self.head_dim)
      return self.output(attention.attend(q, k, v, segment_ids, impl)), (k, v)

  def project(self, x: jax.Array, positions: jax.Array):
    """q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim], normalised and
    rotated: what attention (or a KV cache) takes."""
    cast = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum("bsd,dnh->bsnh", x, cast(self.wq))
    k = jnp.einsum("bsd,dkh->bskh", x, cast(self.wk))
    v = jnp.einsum("bsd,dkh->bskh", x, cast(self.wv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return (apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta),
            v)

  def output(self, out: jax.Array) -> jax.Array:
    """Attention output [batch, seq, heads, head_dim] -> [batch, seq, d_model]."""
    return jnp.einsum("bsnh,nhd->bsd", out, self.wo[...].astype(self.dtype))
