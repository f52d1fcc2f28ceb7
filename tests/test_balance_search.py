"""The balance search's candidates and its summary of a run's metrics, against NumPy."""

import json

import numpy as np
import pytest

from experiments.studies import balance
from configs.cpu_tiny import get_config


def test_candidates_start_from_the_paper_balance():
  """Each candidate is the quickstart with the paper's capacity 2 and coefficient 1e-3 plus its
  own change; the chosen one is what the quickstart config now holds."""
  quickstart = get_config()
  for name, change in balance.CANDIDATES.items():
    config = get_config()
    balance.PAPER_BALANCE(config)
    change(config)
    if name == "base":
      assert (config.model.capacity_factor, config.balance.coef) == (2.0, 1e-3)
    if name == "capacity_4_coef_3e-2":
      assert config.to_dict() == quickstart.to_dict()


def test_summary_counts_the_steps_after_settling(tmp_path):
  rng = np.random.default_rng(0)
  drops = rng.uniform(0, 0.3, size=(10, 3))
  max_dev = rng.uniform(0, 5, size=(10, 3))
  rows = [{"step": 20 * (i + 1), "drop_fraction": drops[i].tolist(),
           "load_max_dev": max_dev[i].tolist(), "lm_loss": 5.0 - i / 10} for i in range(10)]
  rows[-1]["val_loss"] = 4.2
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  summary = balance.summarize(str(path), steps=200, settle=0.25)
  kept = slice(2, 10)  # steps 60..200 are after 0.25 * 200 = 50
  assert summary["steps_counted"] == [60, 200, 8]
  assert summary["drop_mean_per_layer"] == pytest.approx(drops[kept].mean(0), abs=1e-4)
  assert summary["worst_layer_drop_mean"] == pytest.approx(drops[kept].mean(0).max(), abs=1e-4)
  assert summary["load_max_dev_mean_per_layer"] == pytest.approx(max_dev[kept].mean(0), abs=1e-3)
  assert summary["final_val_loss"] == 4.2
