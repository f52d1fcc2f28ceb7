"""ModelConfig validation and parameter counts of the presets."""

import jax
import pytest

from sigma_moe_jax import ModelConfig, count_params


@pytest.mark.parametrize("field,overrides", [
    ("num_heads", dict(d_model=130, num_heads=4)),
    ("num_kv_heads", dict(num_heads=4, num_kv_heads=3)),
    ("top_k", dict(top_k=0)),
    ("top_k", dict(num_experts=8, top_k=9)),
    ("max_top_k", dict(num_layers=4, max_top_k=(2, 2, 1))),
    ("max_top_k", dict(num_experts=8, max_top_k=(9, 1, 1, 1))),
    ("d_model", dict(d_model=0)),
    ("d_ff", dict(d_ff=-5)),
    ("num_experts", dict(num_experts=0)),
    ("vocab_size", dict(vocab_size=0)),
    ("num_layers", dict(num_layers=0)),
    ("head_dim", dict(head_dim=0)),
    ("gate_fn", dict(gate_fn="relu")),
    ("dispatch", dict(dispatch="sparse")),
    ("capacity_factor", dict(capacity_factor=0.0)),
    ("renormalize", dict(renormalize=True, top_k=1)),
    ("dtype", dict(dtype="float8")),
    ("remat", dict(remat="everything")),
])
def test_invalid_fields_name_themselves(field, overrides):
  with pytest.raises(ValueError, match=rf"model\.{field}:"):
    ModelConfig(**{**dict(num_layers=4), **overrides})


def test_presets_are_valid_and_differ_only_in_numbers():
  for preset in (ModelConfig.sigma_moe_tiny, ModelConfig.gpu_small, ModelConfig.cpu_tiny):
    cfg = preset()
    assert cfg.top_k == 1 and cfg.gate_fn == "softmax" and not cfg.renormalize
  assert ModelConfig.sigma_moe_tiny(num_layers=2).num_layers == 2


def test_sigma_moe_tiny_parameter_counts_from_shapes_only():
  live_before = sum(a.nbytes for a in jax.live_arrays())
  counts = count_params(ModelConfig.sigma_moe_tiny())
  assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 1 << 20
  assert 19.5e9 <= counts["total"] <= 20.5e9
  assert abs(counts["active"] - 0.537e9) < 0.01e9  # activated, non-embedding (paper: 0.5B)
  assert counts["embedding"] == 2 * 200_064 * 1536


def test_active_params_follow_the_per_layer_top_k():
  cfg = ModelConfig.sigma_moe_tiny()
  per_expert = 3 * 1536 * 768
  base = count_params(cfg)["active"]
  phase1 = count_params(cfg, [8, 8, 6, 6, 4, 4, 2, 2] + [1] * 48)["active"]
  assert phase1 - base == (40 - 8) * per_expert
  with pytest.raises(ValueError, match="num_layers"):
    count_params(cfg, [1] * 3)
