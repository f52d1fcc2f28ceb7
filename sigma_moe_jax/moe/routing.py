"""The router: float32 scores over all experts, a traced top_k under a static max_top_k."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Routing decisions for `tokens` tokens and `max_top_k` slots, slot 0 the best expert.

  expert_ids [tokens, max_top_k] int32; gate_weights [tokens, max_top_k] float32 (zero where masked);
  valid [tokens, max_top_k] bool: slot rank < top_k and the token is not padding.
  """

  expert_ids: jax.Array
  gate_weights: jax.Array
  valid: jax.Array


def router_logits(x: jax.Array, router: jax.Array) -> jax.Array:
  """x [..., d_model] @ router [d_model, experts] in float32 at full precision, whatever the
  compute dtype: top-1 choices among 96 experts are decided by small logit differences."""
  return jnp.matmul(x.astype(jnp.float32), router.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def route(logits: jax.Array, top_k: jax.Array, max_top_k: int, *, gate_fn: str, renormalize: bool,
          token_mask: Optional[jax.Array] = None,
          selection_bias: Optional[jax.Array] = None) -> Routing:
  """Picks up to `max_top_k` experts per token; slots of rank >= top_k (traced) are masked.

  logits [tokens, experts] must already be float32. `selection_bias` [experts] (the loss-free
  balancing bias) shifts which experts are chosen but never the gate weights.
  """
  if gate_fn == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  elif gate_fn == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    raise ValueError(f"unknown gate function {gate_fn!r}")
  selection = scores if selection_bias is None else scores + selection_bias
  _, expert_ids = jax.lax.top_k(jax.lax.stop_gradient(selection), max_top_k)
  gate_weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  valid = jnp.arange(max_top_k) < top_k
  valid = jnp.broadcast_to(valid, expert_ids.shape)
  if token_mask is not None:
    valid = valid & token_mask[:, None]
  gate_weights = jnp.where(valid, gate_weights, 0.0)
  if renormalize:
    # Never at top_k = 1 (traced): a single renormalized weight is 1.0 and the LM loss no longer
    # reaches the router (see docs/design.md, "No renormalisation at top-1").
    total = jnp.sum(gate_weights, axis=-1, keepdims=True)
    gate_weights = jnp.where(top_k > 1, gate_weights / jnp.where(total > 0, total, 1.0),
                             gate_weights)
  return Routing(expert_ids.astype(jnp.int32), gate_weights, valid)

