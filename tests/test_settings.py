"""Typed launch settings: a bad value in any section is one error that names its config key."""

import pytest

from configs import cpu_tiny
from sigma_moe_jax.training.settings import Settings, from_config


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", 0, "train.steps must be >= 1"),
    ("train.seq_len", 1, "train.seq_len must be >= 2"),
    ("train.lr_schedule", "linear", "train.lr_schedule must be one of"),
    ("train.warmup_steps", 5000, "train.warmup_steps must lie in [0, train.steps=1200)"),
    ("train.lr", -3e-3, "train.lr must be positive, got -0.003"),
    ("train.b2", 1.0, "train.b2 must lie in [0, 1)"),
    ("train.weight_decay", -0.1, "train.weight_decay must be >= 0"),
    ("train.grad_clip", 0.0, "train.grad_clip must be positive"),
    ("train.max_bad_steps", -1, "train.max_bad_steps must be >= 0"),
    ("data.val_fraction", 1.0, "data.val_fraction must lie in [0, 1)"),
    ("data.chunk_chars", -5, "data.chunk_chars must be >= 0"),
    ("balance.coef", -1.0, "balance.coef: must be >= 0"),
    ("balance.loss", "entropy", "balance.loss: must be one of"),
    ("model.gate_fn", "relu", "model.gate_fn: must be one of"),
    ("model.d_model", 0, "model.d_model: must be a positive integer"),
    ("schedule.top_k", "[1]*5", "expected num_layers=6"),
    ("data.format", "parquet", "data.format must be one of ('text', 'chat')"),
    ("data.truncate", True, "data.truncate only applies to data.format 'chat'"),
    ("train.init_mode", "weights", "train.init_mode must be one of ('continue', 'params')"),
    ("model.rope_scaling", "ntk", "model.rope_scaling: must be one of"),
])
def test_bad_values_name_their_key(key, value, message):
  config = cpu_tiny.get_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError) as error:
    from_config(config)
  assert message in str(error.value)
  assert "ModelConfig." not in str(error.value) and "BalanceSettings." not in str(error.value)


def test_settings_carry_every_config_value():
  config = cpu_tiny.get_config()
  settings = from_config(config)
  assert isinstance(settings, Settings)
  for section in ("train", "data", "balance", "mesh"):
    typed = getattr(settings, section)
    assert {name: getattr(typed, name) for name in config[section]} == dict(config[section])
  assert settings.model.num_experts == config.model.num_experts
  assert settings.schedule is None and settings.model.max_top_k is None


def test_post_training_presets_build_and_split_their_batches():
  """The paper-scale SFT stages: top-1 everywhere, chat data, and batches that split over 64
  devices (expert 8 x fsdp 8) into their micro-batches; the long stage stretches RoPE by YaRN."""
  from configs import sft_cpu_tiny, sft_sigma_moe_tiny
  for stage, seq_len in (("short", 4096), ("long", 16_384)):
    settings = from_config(sft_sigma_moe_tiny.get_config(stage))
    assert settings.schedule is None and settings.model.max_top_k_per_layer == (1,) * 56
    assert settings.data.format == "chat" and settings.train.init_mode == "params"
    assert settings.train.seq_len == seq_len
    assert settings.train.batch_size % (settings.train.grad_accum * 64) == 0
    assert settings.train.batch_size * seq_len == 1 << 20  # the same tokens per step
  assert from_config(sft_sigma_moe_tiny.get_config("long")).model.rope_scaling == "yarn"
  with pytest.raises(ValueError, match="unknown stage"):
    sft_sigma_moe_tiny.get_config("medium")
  assert from_config(sft_cpu_tiny.get_config()).data.format == "chat"
