"""Typed launch settings: a bad value in any section is one error that names its config key."""

import pytest

from experiments.configs import cpu_tiny
from experiments.settings import Settings, from_config


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
