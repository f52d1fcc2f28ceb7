"""The Hugging Face Qwen3-MoE format (`Qwen3MoeForCausalLM`): config and tensors both ways.

Sigma-MoE-Tiny's architecture is the one `transformers` calls Qwen3-MoE: GQA with a per-head
RMSNorm on q and k before rotate-half RoPE, untied embeddings, a softmax router over all experts
whose top-k probabilities weight SwiGLU experts (renormalised only with `norm_topk_prob`), no
shared expert. The mapping (torch `Linear` weights are [out, in]; ours are [in, out] and stacked
over layers):

  ours                               Hugging Face
  embed [V, d]                       model.embed_tokens.weight [V, d]
  blocks.attn_norm.scale[l]          model.layers.l.input_layernorm.weight
  blocks.attn.wq[l] [d, H, hd]       model.layers.l.self_attn.q_proj.weight [H*hd, d]  (k, v alike)
  blocks.attn.wo[l] [H, hd, d]       model.layers.l.self_attn.o_proj.weight [d, H*hd]
  blocks.attn.q_norm.scale[l] [hd]   model.layers.l.self_attn.q_norm.weight            (k alike)
  blocks.moe_norm.scale[l]           model.layers.l.post_attention_layernorm.weight
  blocks.moe.router[l] [d, E]        model.layers.l.mlp.gate.weight [E, d]
  blocks.moe.w_gate[l, e] [d, f]     model.layers.l.mlp.experts.e.gate_proj.weight [f, d]  (up alike)
  blocks.moe.w_down[l, e] [f, d]     model.layers.l.mlp.experts.e.down_proj.weight [d, f]
  final_norm.scale                   model.norm.weight
  lm_head [d, V]                     lm_head.weight [V, d]

Every function here works on NumPy arrays, jax arrays or `jax.ShapeDtypeStruct`s (through
`jax.eval_shape`), so the 20B model's export can be planned without allocating it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.layers import YARN_BETA_FAST, YARN_BETA_SLOW

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"

Tensors = Dict[str, jax.Array]


def export_refusals(cfg: ModelConfig, top_k: Sequence[int], loss_free: bool) -> List[str]:
  """What `Qwen3MoeForCausalLM` cannot represent in a model trained with `cfg`, served with the
  per-layer `top_k` (empty: it can)."""
  problems = []
  if len(set(int(k) for k in top_k)) != 1:
    problems.append(f"the top-k differs between layers ({[int(k) for k in top_k]}); Qwen3-MoE "
                    f"has one num_experts_per_tok for every layer")
  if cfg.gate_fn != "softmax":
    problems.append(f"model.gate_fn is {cfg.gate_fn!r}; Qwen3-MoE's router is a softmax")
  if not cfg.qk_norm:
    problems.append("model.qk_norm is off; Qwen3-MoE always normalises q and k")
  if loss_free:
    problems.append("the run used loss-free balancing, whose per-expert selection bias has no "
                    "place in Qwen3-MoE (its routing would change)")
  return problems


def rope_scaling(cfg: ModelConfig) -> Optional[dict]:
  """config.json's `rope_scaling` (None: plain RoPE). Ours is Hugging Face's `yarn` with its
  default betas and attention factor (layers.rope_frequencies)."""
  if cfg.rope_scaling == "none":
    return None
  return {"rope_type": "yarn", "factor": float(cfg.rope_scaling_factor),
          "original_max_position_embeddings": int(cfg.rope_original_len),
          "beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW}


def hf_config(cfg: ModelConfig, *, top_k: int, max_position_embeddings: int,
              eos_token_id: Optional[int], dtype: str = "float32") -> dict:
  """config.json of the exported model."""
  return {
      "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "num_experts": cfg.num_experts, "num_experts_per_tok": int(top_k),
      "moe_intermediate_size": cfg.d_ff, "intermediate_size": cfg.d_ff,
      "norm_topk_prob": bool(cfg.renormalize), "decoder_sparse_step": 1, "mlp_only_layers": [],
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling(cfg),
      "max_position_embeddings": int(max_position_embeddings),
      "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
      "use_sliding_window": False, "sliding_window": None, "output_router_logits": False,
      "torch_dtype": dtype, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
      "use_cache": True,
  }


# Qwen3-MoE settings this model has no counterpart for, with the value that is equivalent to
# having none of the feature.
_MUST_BE = {
    "use_sliding_window": (False, "sliding-window attention"),
    "attention_bias": (False, "biases on the attention projections"),
    "decoder_sparse_step": (1, "dense MLP layers between the MoE layers"),
    "mlp_only_layers": ([], "dense MLP layers"),
    "hidden_act": ("silu", "an expert activation other than SiLU"),
    "shared_expert_intermediate_size": (0, "a shared expert"),
    "num_shared_experts": (0, "shared experts"),
}


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """The ModelConfig of a Qwen3-MoE config.json; `overrides` set the fields config.json
  does not describe (dispatch, dtype, ...). Refuses, naming them, the features this model
  lacks."""
  kind = hf.get("model_type")
  if kind != MODEL_TYPE:
    raise ValueError(f"config.json has model_type {kind!r}; only {MODEL_TYPE!r} "
                     f"({ARCHITECTURE}) can be imported")
  problems = []
  for key, (neutral, feature) in _MUST_BE.items():
    value = hf.get(key, neutral)
    if value not in (neutral, None):
      problems.append(f"{key}={value!r} ({feature})")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  rope_fields = {}
  if rope_type == "yarn":
    unusual = {k: rope[k] for k, default in (("beta_fast", YARN_BETA_FAST),
                                             ("beta_slow", YARN_BETA_SLOW))
               if rope.get(k) not in (None, default)}
    unusual.update({k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim")
                    if rope.get(k) is not None})
    if unusual or not rope.get("factor") or not rope.get("original_max_position_embeddings"):
      problems.append(f"yarn RoPE with settings other than a factor, the original length and "
                      f"the default betas ({unusual or rope})")
    else:
      rope_fields = dict(rope_scaling="yarn", rope_scaling_factor=float(rope["factor"]),
                         rope_original_len=int(rope["original_max_position_embeddings"]))
  elif rope_type != "default":
    problems.append(f"rope scaling {rope_type!r} (only plain RoPE and yarn)")
  num_experts = hf.get("num_experts", hf.get("num_local_experts"))
  top_k = int(hf.get("num_experts_per_tok", 1))
  if hf.get("norm_topk_prob") and top_k == 1:
    problems.append("norm_topk_prob with one expert per token (every gate weight would be 1, "
                    "cutting the router off from the loss)")
  if problems:
    raise ValueError("the Hugging Face model has features this model lacks: "
                     + "; ".join(problems))
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
      head_dim=hf.get("head_dim", hf["hidden_size"] // heads), num_experts=num_experts,
      d_ff=hf["moe_intermediate_size"], top_k=top_k,
      renormalize=bool(hf.get("norm_topk_prob", False)), rope_theta=float(theta),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=True, gate_fn="softmax",
      **rope_fields)
  fields.update(overrides)
  return ModelConfig(**fields)


def _linear_in(w):  # ours [in, ...] -> torch [out, in]
  return jnp.reshape(w, (w.shape[0], -1)).T


def _linear_out(w):  # ours [..., out] -> torch [out, in]
  return jnp.reshape(w, (-1, w.shape[-1])).T


def layer_tensors(cfg: ModelConfig, blocks: dict, layer: int) -> Tensors:
  """The Hugging Face tensors of one layer, from our stacked `blocks` parameters."""
  attn, moe = blocks["attn"], blocks["moe"]
  prefix = f"model.layers.{layer}."
  out = {
      prefix + "input_layernorm.weight": blocks["attn_norm"]["scale"][layer],
      prefix + "post_attention_layernorm.weight": blocks["moe_norm"]["scale"][layer],
      prefix + "self_attn.q_proj.weight": _linear_in(attn["wq"][layer]),
      prefix + "self_attn.k_proj.weight": _linear_in(attn["wk"][layer]),
      prefix + "self_attn.v_proj.weight": _linear_in(attn["wv"][layer]),
      prefix + "self_attn.o_proj.weight": _linear_out(attn["wo"][layer]),
      prefix + "self_attn.q_norm.weight": attn["q_norm"]["scale"][layer],
      prefix + "self_attn.k_norm.weight": attn["k_norm"]["scale"][layer],
      prefix + "mlp.gate.weight": moe["router"][layer].T,
  }
  for e in range(cfg.num_experts):
    expert = f"{prefix}mlp.experts.{e}."
    out[expert + "gate_proj.weight"] = moe["w_gate"][layer, e].T
    out[expert + "up_proj.weight"] = moe["w_up"][layer, e].T
    out[expert + "down_proj.weight"] = moe["w_down"][layer, e].T
  return out


def outer_tensors(params: dict) -> Tensors:
  """Embedding, final norm and output projection."""
  return {"model.embed_tokens.weight": params["embed"],
          "model.norm.weight": params["final_norm"]["scale"],
          "lm_head.weight": params["lm_head"].T}


def export_groups(cfg: ModelConfig) -> List[Tuple[str, object]]:
  """The tensors in writing order, as (group name, function of the params): one group per
  layer, then the outer tensors, so an exporter holds one layer's copy at a time."""
  groups = [(f"layer {l}", lambda p, l=l: layer_tensors(cfg, p["blocks"], l))
            for l in range(cfg.num_layers)]
  return groups + [("embedding and output", outer_tensors)]


def export_plan(cfg: ModelConfig, abstract_params: dict) -> Dict[str, jax.ShapeDtypeStruct]:
  """Every Hugging Face tensor's name, shape and dtype, computed on abstract parameters."""
  plan = {}
  for _, fn in export_groups(cfg):
    plan.update(jax.eval_shape(fn, abstract_params))
  return plan


def params_from_hf(cfg: ModelConfig, tensors: Dict[str, object]) -> dict:
  """Our pure-dict parameters (float32 NumPy) from Hugging Face tensors (per-expert keys, or the
  fused `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` that transformers 5 also writes).
  Raises naming the first missing or misshapen tensor; unused tensors are reported too."""
  used = set()
  d, heads, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  E, f, V = cfg.num_experts, cfg.d_ff, cfg.vocab_size

  def get(name, shape):
    if name not in tensors:
      raise ValueError(f"the Hugging Face checkpoint lacks {name}")
    value = np.asarray(tensors[name], np.float32)
    if value.shape != tuple(shape):
      raise ValueError(f"{name} has shape {list(value.shape)}, expected {list(shape)}")
    used.add(name)
    return value

  def experts(l):
    prefix = f"model.layers.{l}.mlp.experts."
    if prefix + "gate_up_proj" in tensors:
      gate_up = get(prefix + "gate_up_proj", (E, 2 * f, d))
      down = get(prefix + "down_proj", (E, d, f))
      return (gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1),
              down.transpose(0, 2, 1))
    gate = np.stack([get(f"{prefix}{e}.gate_proj.weight", (f, d)).T for e in range(E)])
    up = np.stack([get(f"{prefix}{e}.up_proj.weight", (f, d)).T for e in range(E)])
    down = np.stack([get(f"{prefix}{e}.down_proj.weight", (d, f)).T for e in range(E)])
    return gate, up, down

  layers = []
  for l in range(cfg.num_layers):
    p = f"model.layers.{l}."
    gate, up, down = experts(l)
    layers.append({
        "attn_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
        "moe_norm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
        "attn": {
            "wq": get(p + "self_attn.q_proj.weight", (heads * hd, d)).T.reshape(d, heads, hd),
            "wk": get(p + "self_attn.k_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
            "wv": get(p + "self_attn.v_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
            "wo": get(p + "self_attn.o_proj.weight", (d, heads * hd)).T.reshape(heads, hd, d),
            "q_norm": {"scale": get(p + "self_attn.q_norm.weight", (hd,))},
            "k_norm": {"scale": get(p + "self_attn.k_norm.weight", (hd,))},
        },
        "moe": {"router": get(p + "mlp.gate.weight", (E, d)).T, "w_gate": gate, "w_up": up,
                "w_down": down},
    })
  blocks = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  embed = get("model.embed_tokens.weight", (V, d))
  head = (get("lm_head.weight", (V, d)) if "lm_head.weight" in tensors else embed).T.copy()
  final_norm = get("model.norm.weight", (d,))
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"the Hugging Face checkpoint has tensors this model has no place for: "
                     f"{unused[:5]}{' ...' if len(unused) > 5 else ''}")
  return {"embed": embed, "blocks": blocks, "final_norm": {"scale": final_norm},
          "lm_head": np.ascontiguousarray(head)}


def shard_names(num_shards: int) -> List[str]:
  if num_shards == 1:
    return ["model.safetensors"]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def plan_shards(sizes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
  """Tensors in order, cut into shards of at most `max_shard_bytes` (a larger tensor alone)."""
  shards, current, used = [], [], 0
  for name, size in sizes.items():
    if current and used + size > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  if current:
    shards.append(current)
  return shards

