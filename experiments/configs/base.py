"""Every key a training config has, with its default. Config files start from `make_config`.

The defaults and the meaning of each key live in the typed settings (`experiments/settings.py`
for train, data and mesh; `sigma_moe_jax.train.BalanceSettings`; `sigma_moe_jax.ModelConfig`);
this file turns them into an ml_collections config that the command line can override.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from experiments.settings import SCHEDULE_DEFAULTS, DataSettings, MeshSettings, TrainSettings
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.train import BalanceSettings

# Fields whose default is None need a typed placeholder to be overridable from the command line.
_OPTIONAL_MODEL_FIELDS = {"head_dim": int, "capacity_factor": float, "embed_init_std": float}


def make_config(model: ModelConfig) -> ml_collections.ConfigDict:
  fields = dataclasses.asdict(model)
  # The static per-layer maximum top-k comes from the schedule, never from the config.
  fields.pop("max_top_k")
  for name, kind in _OPTIONAL_MODEL_FIELDS.items():
    if fields[name] is None:
      fields[name] = config_dict.placeholder(kind)
  c = ml_collections.ConfigDict()
  c.model = fields
  c.train = dataclasses.asdict(TrainSettings())
  c.data = dataclasses.asdict(DataSettings())
  c.balance = dataclasses.asdict(BalanceSettings())
  # kind "fixed": per-layer top-k phases in top_k, "start:per_layer; start:per_layer" (start: a
  # step, or a fraction of train.steps when it has a '.'); empty: model.top_k in every layer.
  # kind "adaptive" (sigma_moe_jax.schedule.AdaptiveTopK): top_k is the per-layer start (one
  # phase, e.g. "[2]*6"), target the per-layer end (empty: model.top_k everywhere). dev_l: the
  # most loaded expert (max_i a_i * E - 1) of the load layer l would have at top-1, averaged
  # over ~`smoothing` steps. A layer lowers its k by one once dev_l was at most the median
  # layer's + `threshold` in at least `calm_fraction` of the last `patience` steps (1.0: all of
  # them, in a row), goes back up by one above the median + `raise_above`,
  # and every layer is at its target by `deadline` (a fraction of train.steps).
  c.schedule = dict(SCHEDULE_DEFAULTS)
  c.mesh = dataclasses.asdict(MeshSettings())
  return c
