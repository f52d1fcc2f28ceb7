"""Parameter counts from abstract shapes: nothing is allocated."""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
from flax import nnx

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.model import Transformer

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves, built under eval_shape."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig, top_k: Optional[Sequence[int]] = None) -> Dict[str, int]:
  """Total, embedding and activated parameter counts.

  `active` follows the paper's convention: parameters a token activates outside the embedding
  and LM head (attention, norms, every router, and k experts per layer), for the per-layer top-k
  `top_k` (default: the config's top_k everywhere). `active_with_embedding` adds both embedding
  matrices whole (input embedding and LM head).
  """
  top_k = [cfg.top_k] * cfg.num_layers if top_k is None else [int(k) for k in top_k]
  return dict(_count_params(cfg, tuple(top_k)))


@functools.lru_cache(maxsize=64)
def _count_params(cfg: ModelConfig, top_k: Tuple[int, ...]) -> Tuple[Tuple[str, int], ...]:
  # Cached: the training loop asks at every log line (for the FLOPs of the current top-k).
  if len(top_k) != cfg.num_layers:
    raise ValueError(f"top_k has {len(top_k)} entries, expected num_layers={cfg.num_layers}")
  if any(not 1 <= k <= cfg.num_experts for k in top_k):
    raise ValueError(f"top_k entries must lie in [1, {cfg.num_experts}]")
  state = nnx.state(abstract_model(cfg), nnx.Param)
  total = embedding = experts = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    size = math.prod(leaf.shape)
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    total += size
    if names[0] in ("embed", "lm_head"):
      embedding += size
    if any(n in _EXPERT_WEIGHTS for n in names):
      experts += size
  per_expert = experts // (cfg.num_layers * cfg.num_experts)
  active = total - embedding - experts + sum(top_k) * per_expert
  return (("total", total), ("embedding", embedding), ("active", active),
          ("active_with_embedding", active + embedding))
