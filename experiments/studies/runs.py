"""Reading a trained variant back: its metrics.jsonl as records by step, and series of them."""

from __future__ import annotations

import gzip
import json
from typing import Dict, NamedTuple

import ml_collections
import numpy as np

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.infra import storage
from sigma_moe_jax.params import count_params
from sigma_moe_jax.training.settings import model_and_schedule


class Run(NamedTuple):
  """One variant's metrics: `records` by step (a resumed run's later record of a step wins)."""
  name: str
  config: ml_collections.ConfigDict
  records: Dict[int, dict]

  def series(self, key: str):
    """(steps, values) of every record that has `key`, in step order."""
    steps = sorted(s for s, r in self.records.items() if key in r)
    return np.asarray(steps), np.asarray([self.records[s][key] for s in steps], np.float64)

  def last(self, key: str):
    steps, values = self.series(key)
    if not len(steps):
      raise ValueError(f"run {self.name!r} logged no {key!r}")
    return values[-1]

  def model(self) -> ModelConfig:
    return model_and_schedule(self.config)[0]

  def schedule(self):
    return model_and_schedule(self.config)[1]

  def active_params(self, step: int) -> int:
    schedule = self.schedule()
    top_k = None if schedule is None else [int(k) for k in schedule.top_k_at(step)]
    return count_params(self.model(), top_k)["active"]


def read_run(name: str, config, run_dir: str) -> Run:
  records = {}
  for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines():
    record = json.loads(line)
    records.setdefault(record["step"], {}).update(record)
  return Run(name, config, records)


def joined(first: Run, second: Run) -> Run:
  """A run started from another's checkpoint (train.init_from), with the other's records up to
  the branch step."""
  branch = second.config.train.init_step
  records = {s: r for s, r in first.records.items() if s <= branch}
  records.update(second.records)
  return Run(second.name, second.config, records)


# What a shipped run keeps of each training step (every evaluation's metrics are kept whole):
# enough for every analysis and figure, without the per-step f and p (8 x 32 floats each).
STEP_KEYS = ("loss", "lm_loss", "lbl", "lbl_per_layer", "drop_fraction", "load_max_dev",
             "load_min_dev", "load_cv", "gate_prob_cv", "top_k", "first_choice_max_dev",
             "bias_abs_mean", "bias_std")
SIGNIFICANT_DIGITS = 6


def _rounded(value):
  if isinstance(value, float):
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  return value


def compact(run: Run) -> Run:
  """`run` with only what the studies read: every evaluation metric ("val" in its name), the
  STEP_KEYS of every step, floats rounded to SIGNIFICANT_DIGITS."""
  records = {}
  for step, record in run.records.items():
    kept = {k: _rounded(v) for k, v in record.items() if k in STEP_KEYS or "val" in k}
    if kept:
      records[step] = kept
  return Run(run.name, run.config, records)


def write_shipped(run: Run, path: str):
  """Writes a compact run (its config and records) as gzipped JSON, for docs/results/runs/."""
  payload = {"name": run.name, "config": run.config.to_dict(),
             "records": [{"step": int(s), **r} for s, r in sorted(run.records.items())]}
  storage.write_bytes(path, gzip.compress(json.dumps(payload, separators=(",", ":")).encode(),
                                          mtime=0))


def read_shipped(path: str) -> Run:
  """A run written by write_shipped."""
  try:
    payload = json.loads(gzip.decompress(storage.read_bytes(path)))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a shipped run (gzipped JSON): {e}") from None
  return Run(payload["name"], ml_collections.ConfigDict(payload["config"]),
             {r.pop("step"): r for r in payload["records"]})
