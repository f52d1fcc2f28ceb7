"""Reading a trained variant back: its metrics.jsonl as records by step, and series of them."""

from __future__ import annotations

import json
from typing import Dict, NamedTuple

import ml_collections
import numpy as np

from experiments.settings import model_and_schedule
from sigma_moe_jax import ModelConfig
from sigma_moe_jax import storage
from sigma_moe_jax.params import count_params


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
