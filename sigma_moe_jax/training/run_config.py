"""A run's config as a dict of sections, generated from the typed settings: every key with its
default (`make_config`), the defaults for keys an older config lacks (`with_defaults`), unknown
keys named with the closest known one (`check_keys`), and the one rule on which keys may differ
between a checkpoint and the run that loads it (`differences`).

Sections and their types: model `ModelConfig`, train `TrainSettings`, data `DataSettings`,
balance `BalanceSettings`, schedule `ScheduleSettings`, mesh `MeshSettings`. A field's
`metadata["changes"]` says when it may change; otherwise its section's rule applies:

  never     the architecture: parameters and routing are built from it (model keys).
  new_run   a resumed run keeps it; a run started from another's checkpoint (`train.init_from`)
            may change it: the schedule, RoPE, the data stream (`_stream` keys).
  always    the rest: cadence, optimizer settings, balancing, the mesh, kernels.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import typing
from typing import List, Optional

import ml_collections
from ml_collections import config_dict

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.training.settings import SECTIONS, defaults, section_fields, with_defaults

SECTION_RULE = {"model": "never", "schedule": "new_run", "train": "always", "data": "always",
                "balance": "always", "mesh": "always"}



def check_keys(config) -> None:
  """ValueError naming an unknown section or key (a misspelt key would silently do nothing)."""
  known = defaults()
  for section in config.keys():
    if section not in known:
      raise ValueError(f"unknown config section {section!r}; known: {sorted(known)}")
    for key in config[section].keys():
      problem = unknown_key(f"{section}.{key}")
      if problem:
        raise ValueError(problem)


def unknown_key(key: str) -> str:
  """'' when `key` ("train.steps") is a config key, else a message naming the closest one."""
  known = [f"{section}.{name}" for section, values in defaults().items() for name in values]
  if key in known:
    return ""
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else f"; sections: {sorted(SECTIONS)}"
  return f"unknown config key {key!r}{hint}"


def make_config(model: Optional[ModelConfig] = None) -> ml_collections.ConfigDict:
  """Every key a training config has, with its default, around `model`: config files start
  here and the command line overrides its keys (`--config.train.steps=...`)."""
  c = ml_collections.ConfigDict()
  hints = typing.get_type_hints(ModelConfig)
  for section, values in defaults().items():
    if section == "model":
      values = {k: v for k, v in dataclasses.asdict(model or ModelConfig()).items()
                if k in values}
      # A key whose value is None needs a typed placeholder to be settable from the command line.
      values = {k: config_dict.placeholder(_optional_type(hints[k])) if v is None else v
                for k, v in values.items()}
    c[section] = values
  return c


def _optional_type(hint) -> type:
  """int for Optional[int]."""
  return next(a for a in typing.get_args(hint) if a is not type(None))


def _changed(saved: dict, current: dict):
  """(section, key, rule, checkpoint value, config value) of every key that differs, missing keys
  at their defaults; a fixed schedule's adaptive keys are never compared."""
  saved, current = with_defaults(saved), with_defaults(current)
  for section in SECTIONS:
    fixed = section == "schedule" and saved[section]["kind"] == current[section]["kind"] == "fixed"
    for f in section_fields(section):
      if fixed and f.name not in ("kind", "top_k"):
        continue
      was, now = saved[section][f.name], current[section][f.name]
      if was != now:
        yield section, f.name, f.metadata.get("changes", SECTION_RULE[section]), was, now


def differences(saved: dict, current: dict, *, new_run: bool) -> List[str]:
  """The keys of `current` that may not differ from `saved` (a checkpoint's config) and do, as
  "section.key: checkpoint x, config y": on resume (`new_run` False) every key but those that
  change `always`; for a run started from the checkpoint (`new_run`), the `never` keys only.
  Missing keys count as their defaults. A fixed schedule's adaptive keys are never compared."""
  allowed = ("always", "new_run") if new_run else ("always",)
  return [f"{section}.{key}: checkpoint {was!r}, config {now!r}"
          for section, key, rule, was, now in _changed(saved, current) if rule not in allowed]


def changed_on_new_run(saved: dict, current: dict, section: str = "model") -> List[str]:
  """The `new_run` keys of a section that differ (e.g. RoPE when a run starts from another's)."""
  return [f"{s}.{key}: checkpoint {was!r}, config {now!r}"
          for s, key, rule, was, now in _changed(saved, current)
          if s == section and rule == "new_run"]


def load_config(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file, as `--config=path[:arg]` loads it. A config file built
  on another names it relative to itself: `load_config(sibling(__file__, "cpu_tiny.py"))`."""
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or not os.path.isfile(path):
    raise ValueError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def sibling(file: str, name: str) -> str:
  """The path of `name` in the folder of `file` (a config file's own `__file__`)."""
  return os.path.join(os.path.dirname(os.path.abspath(file)), name)
