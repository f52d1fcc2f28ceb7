"""Model configuration: one frozen dataclass, validated at construction.

Presets are classmethods that differ only in numbers; nothing in the library branches on a
preset's name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from sigma_moe_jax.attention import ATTENTIONS
from sigma_moe_jax.layers import ROPE_SCALINGS, AttentionConfig, RoPE
from sigma_moe_jax.moe.balancing import LBL_MODES
from sigma_moe_jax.moe.dispatch import DISPATCHES
from sigma_moe_jax.moe.grouped_matmul import GROUPED_MATMULS
from sigma_moe_jax.moe.layer import MoEConfig

GATE_FUNCTIONS = ("softmax", "sigmoid")
COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
EXPERT_EXCHANGES = ("all_to_all", "ragged_all_to_all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Sigma-MoE style decoder.

  Every layer is attention followed by a mixture of SwiGLU experts. `top_k` is the number of
  experts each token activates at the end of training; `max_top_k` is the static per-layer
  maximum that a progressive-sparsification schedule may ask for (the traced per-layer k at a
  step is at most this). Parameters never depend on k, so one checkpoint serves every phase.
  """

  vocab_size: int = 4096
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: Optional[int] = None  # None: d_model // num_heads
  num_experts: int = 16
  d_ff: int = 128  # intermediate size of one expert
  top_k: int = 1
  max_top_k: Optional[Tuple[int, ...]] = None  # None: top_k in every layer
  gate_fn: str = "softmax"
  # Renormalizing a single weight makes it exactly 1 and cuts the router off from the LM loss,
  # so it is only allowed where a layer can activate more than one expert.
  renormalize: bool = False
  dispatch: str = "padded"
  # Kernel of the `ragged` dispatch's grouped matmul and of attention; `auto` picks per platform
  # (grouped_matmul.py, attention.py): megablox and splash on TPU, Mosaic GPU and cuDNN on a
  # Hopper GPU, XLA on the CPU.
  grouped_matmul: str = dataclasses.field(default="auto", metadata={"changes": "always"})
  attention: str = dataclasses.field(default="auto", metadata={"changes": "always"})
  # Scope of the load-balancing loss (see balancing.py): global batch (the paper), each shard's
  # micro-batch, or each sequence. top1_lbl_tau is the temperature of the Top-1 LBL (Eq. 2).
  lbl_mode: str = "global"
  top1_lbl_tau: float = 1.0
  capacity_factor: Optional[float] = None  # None: dropless
  # How tokens reach experts on other devices (mesh axis `expert` > 1): fixed-size buffers with
  # all_to_all (any backend; drops past capacity), or dropless ragged_all_to_all (GPU / TPU).
  expert_exchange: str = "all_to_all"
  rope_theta: float = dataclasses.field(default=10_000.0, metadata={"changes": "new_run"})
  # Context extension (layers.rope_frequencies): `yarn` stretches the rotations of a model
  # trained on rope_original_len positions by rope_scaling_factor. Parameters do not depend on
  # these keys (nor on rope_theta), so a run may change them when it starts from another's.
  rope_scaling: str = dataclasses.field(default="none", metadata={"changes": "new_run"})
  rope_scaling_factor: float = dataclasses.field(default=1.0, metadata={"changes": "new_run"})
  rope_original_len: int = dataclasses.field(default=0, metadata={"changes": "new_run"})
  norm_eps: float = 1e-6
  qk_norm: bool = True
  init_std: float = 0.0125
  # Token embeddings' init std (None: init_std). Blocks see RMS-normalised inputs, so their
  # first outputs have a size independent of the embeddings'; with embeddings much smaller than
  # those, the residual stream starts out dominated by attention's averages over the prefix, a
  # direction shared by every token, and the routers of the upper layers send most tokens to one
  # expert from step 0 (docs/reproduction.md, "A balanced quickstart").
  embed_init_std: Optional[float] = None
  dtype: str = "float32"  # compute dtype; parameters and the router stay float32
  # How much of the forward pass the backward recomputes: memory, never the result.
  remat: str = dataclasses.field(default="none", metadata={"changes": "always"})
  # One `lax.scan` over the stacked layers (a compile time independent of the depth), or the
  # layers unrolled into one straight program (no per-layer slicing and stacking of the scan's
  # carries and residuals: faster on the CPU for a few layers, at a compile time that grows with
  # the depth; docs/design.md "Where the train step's time goes"). Same parameters, same result.
  scan_layers: bool = dataclasses.field(default=True, metadata={"changes": "always"})

  def __post_init__(self):
    if self.max_top_k is not None:
      object.__setattr__(self, "max_top_k", tuple(int(k) for k in self.max_top_k))
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "num_experts", "d_ff"):
      _require(name, isinstance(getattr(self, name), int) and getattr(self, name) > 0,
               "must be a positive integer")
    if self.head_dim is None:
      _require("num_heads", self.d_model % self.num_heads == 0,
               f"must divide d_model ({self.d_model}) when head_dim is derived")
    else:
      _require("head_dim", isinstance(self.head_dim, int) and self.head_dim > 0,
               "must be a positive integer")
    _require("num_kv_heads", self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads")
    _require("top_k", 1 <= self.top_k <= self.num_experts,
             f"must be in [1, num_experts={self.num_experts}]")
    if self.max_top_k is not None:
      _require("max_top_k", len(self.max_top_k) == self.num_layers,
               f"has {len(self.max_top_k)} entries, expected num_layers={self.num_layers}")
      _require("max_top_k", all(1 <= k <= self.num_experts for k in self.max_top_k),
               f"entries must be in [1, num_experts={self.num_experts}]")
      _require("max_top_k", all(k >= self.top_k for k in self.max_top_k),
               f"entries must be >= top_k={self.top_k}")
    _require("gate_fn", self.gate_fn in GATE_FUNCTIONS, f"must be one of {GATE_FUNCTIONS}")
    _require("dispatch", self.dispatch in DISPATCHES,
             f"must be one of {tuple(DISPATCHES)}")
    _require("grouped_matmul", self.grouped_matmul in GROUPED_MATMULS,
             f"must be one of {GROUPED_MATMULS}")
    _require("attention", self.attention in ATTENTIONS, f"must be one of {ATTENTIONS}")
    _require("renormalize", not self.renormalize or max(self.max_top_k_per_layer) > 1,
             "needs a layer with k > 1: at k = 1 the gate weight becomes 1 and the router "
             "gets no gradient from the language-modelling loss")
    _require("capacity_factor", self.capacity_factor is None or self.capacity_factor > 0,
             "must be positive or None (dropless)")
    _require("lbl_mode", self.lbl_mode in LBL_MODES, f"must be one of {LBL_MODES}")
    _require("expert_exchange", self.expert_exchange in EXPERT_EXCHANGES,
             f"must be one of {EXPERT_EXCHANGES}")
    for name in ("rope_theta", "norm_eps", "init_std", "top1_lbl_tau"):
      _require(name, getattr(self, name) > 0, "must be positive")
    _require("rope_scaling", self.rope_scaling in ROPE_SCALINGS,
             f"must be one of {ROPE_SCALINGS}")
    if self.rope_scaling == "yarn":
      _require("rope_scaling_factor", self.rope_scaling_factor > 1,
               "must be > 1 with rope_scaling 'yarn' (the context's growth)")
      _require("rope_original_len", self.rope_original_len > 0,
               "must be the pre-training context (> 0) with rope_scaling 'yarn'")
    _require("embed_init_std", self.embed_init_std is None or self.embed_init_std > 0,
             "must be positive or None (init_std)")
    _require("dtype", self.dtype in COMPUTE_DTYPES, f"must be one of {COMPUTE_DTYPES}")
    _require("remat", self.remat in REMAT_POLICIES, f"must be one of {REMAT_POLICIES}")
    _require("scan_layers", isinstance(self.scan_layers, bool), "must be True or False")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def max_top_k_per_layer(self) -> Tuple[int, ...]:
    """Static maximum experts per token in each layer."""
    return self.max_top_k or (self.top_k,) * self.num_layers

  @property
  def rope(self) -> RoPE:
    return RoPE(self.rope_theta, self.rope_scaling, self.rope_scaling_factor,
                self.rope_original_len)

  @property
  def attention_config(self) -> AttentionConfig:
    """What each layer's `Attention` is built from."""
    return AttentionConfig(self.d_model, self.num_heads, self.num_kv_heads,
                           self.resolved_head_dim, qk_norm=self.qk_norm, norm_eps=self.norm_eps,
                           init_std=self.init_std, dtype=self.dtype,
                           implementation=self.attention, rope=self.rope,
                           keep_weights=not self.scan_layers)

  @property
  def moe_config(self) -> MoEConfig:
    """What each layer's `MoE` is built from."""
    return MoEConfig(self.d_model, self.d_ff, self.num_experts, gate_fn=self.gate_fn,
                     renormalize=self.renormalize, dispatch=self.dispatch,
                     capacity_factor=self.capacity_factor, init_std=self.init_std,
                     dtype=self.dtype, lbl_mode=self.lbl_mode, top1_lbl_tau=self.top1_lbl_tau,
                     expert_exchange=self.expert_exchange, grouped_matmul=self.grouped_matmul)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # Presets ---------------------------------------------------------------------------------

  @classmethod
  def sigma_moe_tiny(cls, **overrides) -> "ModelConfig":
    """The paper's model: 56 layers, 96 experts of SwiGLU 768, top-1, about 20B / 0.5B."""
    return cls(**{**dict(vocab_size=200_064, d_model=1536, num_layers=56, num_heads=16,
                         num_kv_heads=4, head_dim=96, num_experts=96, d_ff=768, top_k=1),
                  **overrides})

  @classmethod
  def gpu_small(cls, **overrides) -> "ModelConfig":
    """The same 96-expert top-1 structure, about 1.6B parameters: fits one 80 GB GPU."""
    return cls(**{**dict(vocab_size=32_768, d_model=1024, num_layers=10, num_heads=16,
                         num_kv_heads=4, head_dim=64, num_experts=96, d_ff=512, top_k=1),
                  **overrides})

  @classmethod
  def cpu_tiny(cls, **overrides) -> "ModelConfig":
    """Trains on two CPU cores in minutes."""
    return cls(**{**dict(vocab_size=4096, d_model=128, num_layers=6, num_heads=4,
                         num_kv_heads=2, head_dim=32, num_experts=32, d_ff=128, top_k=1,
                         capacity_factor=2.0),
                  **overrides})


def _require(field: str, ok: bool, rule: str) -> None:
  if not ok:  # named as the config key, as a launcher's user writes it
    raise ValueError(f"model.{field}: {rule}")
