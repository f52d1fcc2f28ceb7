"""The config as sections of keys: defaults for older configs, unknown keys, and the one rule on
which keys may differ between a checkpoint and the run that loads it."""

import dataclasses

import pytest

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.training.run_config import differences, make_config, unknown_key, with_defaults
from sigma_moe_jax.training.settings import (DataSettings, ScheduleSettings, TrainSettings,
                                             from_config)


def config_dict(**changes):
  """make_config's dict with `changes` ({"section.key": value}) applied."""
  config = make_config(ModelConfig(num_layers=2)).to_dict()
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_make_config_lists_every_field_of_the_typed_settings_with_its_default():
  config = make_config(ModelConfig.cpu_tiny()).to_dict()
  assert config["train"] == dataclasses.asdict(TrainSettings())
  assert config["data"] == dataclasses.asdict(DataSettings())
  assert config["schedule"] == dataclasses.asdict(ScheduleSettings())
  model = dataclasses.asdict(ModelConfig.cpu_tiny())
  del model["max_top_k"]  # derived from the schedule, never set
  assert config["model"] == model
  settings = from_config(make_config(ModelConfig.cpu_tiny()))
  assert settings.model == ModelConfig.cpu_tiny() and settings.schedule is None


def test_an_older_config_gets_the_defaults_of_the_keys_it_lacks_and_renamed_keys_move():
  old = config_dict()
  del old["data"]["order_seed"], old["model"]["top1_lbl_tau"], old["mesh"]
  old["schedule"] = {"kind": "fixed", "topk": "0:[2,1]"}  # before the key was named top_k
  filled = with_defaults({**old, "fingerprint": {"tokenizer_sha256": "ab"}})
  assert filled["data"]["order_seed"] == -1 and filled["model"]["top1_lbl_tau"] == 1.0
  assert filled["schedule"]["top_k"] == "0:[2,1]" and "topk" not in filled["schedule"]
  assert filled["mesh"] == make_config().to_dict()["mesh"]
  assert filled["fingerprint"] == {"tokenizer_sha256": "ab"}
  assert from_config(old).schedule.per_layer[0] == (2, 1)


@pytest.mark.parametrize("key, value, on_resume, on_new_run", [
    ("model.d_ff", 64, True, True),  # architecture: never
    ("model.rope_theta", 5e5, True, False),  # RoPE: a new run may change it
    ("model.attention", "xla", False, False),  # a kernel: free
    ("model.remat", "full", False, False),
    ("schedule.top_k", "0:[2,2]", True, False),
    ("data.path", "other.txt", True, False),  # the data stream
    ("train.batch_size", 16, True, False),
    ("train.lr", 1.0, False, False),  # cadence and optimizer settings: free
    ("balance.coef", 0.5, False, False),
    ("mesh.expert", 2, False, False),
])
def test_which_keys_may_change_on_resume_and_on_a_new_run(key, value, on_resume, on_new_run):
  saved, current = config_dict(), config_dict(**{key: value})
  assert bool(differences(saved, current, new_run=False)) == on_resume
  assert bool(differences(saved, current, new_run=True)) == on_new_run
  if on_resume:
    assert differences(saved, current, new_run=False)[0].startswith(f"{key}: checkpoint ")


def test_a_fixed_schedule_ignores_the_adaptive_keys_and_missing_keys_are_defaults():
  saved = config_dict()
  assert not differences(saved, config_dict(**{"schedule.patience": 7}), new_run=False)
  adaptive = config_dict(**{"schedule.kind": "adaptive", "schedule.top_k": "[2]*2"})
  assert differences(adaptive, {**adaptive, "schedule": {**adaptive["schedule"], "patience": 7}},
                     new_run=False) == ["schedule.patience: checkpoint 50, config 7"]
  del saved["data"]["order_seed"]
  assert not differences(saved, config_dict(), new_run=False)
  assert differences(saved, config_dict(**{"data.order_seed": 3}), new_run=False)


def test_unknown_keys_name_the_closest_one():
  assert unknown_key("train.steps") == ""
  assert "did you mean train.steps?" in unknown_key("train.step")
  assert "sections:" in unknown_key("zzz.qqqq")
