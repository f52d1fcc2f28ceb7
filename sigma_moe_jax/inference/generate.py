"""Inference: prefill with a KV cache, a jitted decode loop, sampling, and log-likelihood scoring.

  model_cfg = inference_config(train_cfg)           # dropless, no remat
  prefill, decode = make_generate(graphdef, max_new_tokens, Sampling(...), eos_id)
  logits, cache = prefill(params, tokens, lengths, top_k)           # tokens [B, P], right-padded
  new_tokens, new_lengths = decode(params, logits, cache, lengths, top_k, key)

Pure functions of explicit state, as the train step. Prompts of different lengths share one
batch: row b's prompt is tokens[b, :lengths[b]]; its generated tokens go to cache positions
lengths[b], lengths[b] + 1, ... Prefill runs the model's own MoE (dropless). A decode step
routes its few tokens through their own experts' weights, gathered per token
(`moe.gathered_experts`), so it neither drops a token nor pays for capacity buffers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigma_moe_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the model's distribution."""

  temperature: float = 1.0  # 0: greedy (argmax)
  top_k: int = 0  # keep only the k most likely tokens (0: all)
  top_p: float = 1.0  # keep the smallest set of most likely tokens with probability >= top_p

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


class Cache(NamedTuple):
  k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  v: jax.Array


def inference_config(cfg: ModelConfig) -> ModelConfig:
  """The model for inference: dropless (no token is ever dropped when scoring or generating),
  no rematerialisation. The parameters are those of `cfg`."""
  return cfg.replace(capacity_factor=None, remat="none")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits float32 [B, V] -> token ids int32 [B]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    # Keep a token when the mass before it is below top_p: the most likely one always stays.
    keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill(model, tokens: jax.Array, lengths: jax.Array, top_k: jax.Array, max_len: int,
            selection_bias: Optional[jax.Array] = None) -> Tuple[jax.Array, Cache]:
  """Runs the prompts (tokens [B, P], row b valid up to lengths[b]) and returns the logits of the
  next token after each prompt [B, V] and the cache, with room for max_len positions."""
  batch, prompt_len = tokens.shape
  segment_ids = (jnp.arange(prompt_len)[None] < lengths[:, None]).astype(jnp.int32)
  x, _, (keys, values) = model.hidden_states(tokens, segment_ids, top_k=top_k,
                                             selection_bias=selection_bias, return_kv=True)
  pad = ((0, 0), (0, 0), (0, max_len - prompt_len), (0, 0), (0, 0))
  logits = model.logits(x[jnp.arange(batch), lengths - 1])
  return logits, Cache(jnp.pad(keys, pad), jnp.pad(values, pad))


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache: Cache, top_k: jax.Array,
                selection_bias: Optional[jax.Array] = None) -> Tuple[jax.Array, Cache]:
  """One token per row (tokens [B] at positions [B]): writes its keys and values into the cache
  and returns the next token's logits [B, V] and the cache (`Block.decode` in every layer)."""
  max_len = cache.k.shape[2]
  x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.dtype(model.cfg.dtype))[:, None]
  visible = (jnp.arange(max_len)[None] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, T]

  def step(block, x, row, max_top_k):
    layer_top_k, bias, cache_k, cache_v = row
    return block.decode(x, positions, cache_k, cache_v, visible, layer_top_k, max_top_k, bias)

  x, (keys, values) = model.scan_layers(x, step, (top_k, selection_bias, cache.k, cache.v))
  return model.logits(model.final_norm(x)[:, 0]), Cache(keys, values)


def make_generate(graphdef, max_new_tokens: int, sampling: Sampling, eos_id: Optional[int]):
  """(prefill, decode), both jitted; `decode` compiles once per batch and length budget.

  prefill(params, tokens [B, P], lengths [B], top_k [layers], bias) -> (logits [B, V], cache)
  decode(params, logits, cache, lengths, top_k, key, bias) -> (new tokens [B, max_new_tokens],
      number generated [B]); a row stops after eos_id (kept) or at max_new_tokens.
  """

  @jax.jit
  def prefill_fn(params, tokens, lengths, top_k, selection_bias=None):
    model = nnx.merge(graphdef, params)
    return prefill(model, tokens, lengths, top_k, tokens.shape[1] + max_new_tokens,
                   selection_bias)

  @jax.jit
  def decode_fn(params, logits, cache, lengths, top_k, key, selection_bias=None):
    model = nnx.merge(graphdef, params)
    batch = lengths.shape[0]

    def step_fn(carry):
      step, logits, cache, out, done, key, generated = carry
      key, draw = jax.random.split(key)
      token = sample(logits, draw, sampling)
      out = out.at[:, step].set(jnp.where(done, 0, token))
      generated = generated + (~done).astype(jnp.int32)
      if eos_id is not None:
        done = done | (token == eos_id)
      logits, cache = decode_step(model, token, lengths + step, cache, top_k, selection_bias)
      return step + 1, logits, cache, out, done, key, generated

    def not_finished(carry):
      step, _, _, _, done, _, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done)

    init = (jnp.int32(0), logits, cache, jnp.zeros((batch, max_new_tokens), jnp.int32),
            jnp.zeros((batch,), bool), key, jnp.zeros((batch,), jnp.int32))
    _, _, _, out, _, _, generated = jax.lax.while_loop(not_finished, step_fn, init)
    return out, generated

  return prefill_fn, decode_fn


def pad_prompts(prompts, multiple: int = 16) -> Tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens int32 [B, P] right-padded with 0, lengths [B]); P is rounded up to a
  multiple so that prompts of nearby lengths share one compiled prefill."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token")
  width = -(-int(lengths.max()) // multiple) * multiple
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, lengths


def token_logprobs(model, tokens: jax.Array, segment_ids: jax.Array,
                   top_k: Optional[jax.Array] = None) -> jax.Array:
  """log p(tokens[:, t + 1] | tokens[:, :t + 1]) for every t: float32 [B, S - 1], the full
  forward pass (what multiple-choice scoring and perplexity sum)."""
  logits, _ = model(tokens, segment_ids, top_k=top_k)
  logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
