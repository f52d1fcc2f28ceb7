"""Which settings keep top-1 routing balanced in a small model: trains a config under several
candidate changes and measures, per layer, the share of assignments dropped over capacity and the
most loaded expert, after the first part of training (docs/reproduction.md, "Routing collapse
at this scale"). Every candidate starts from the quickstart config with the paper's balance
settings (capacity factor 2, LBL coefficient 1e-3, which it had before this search chose
`capacity_4_coef_3e-2`), unless --nofrom_paper.

  python -m experiments.balance_search --workdir=runs/balance_search \\
      --candidates=base,coef_1e-2 --config.train.steps=400

Each candidate trains in <workdir>/<candidate> (an interrupted one resumes, a finished one is
reused); <workdir>/results.json gets, per candidate, the mean and worst per-layer drop fraction
over the logged steps after `--settle` of the run, the most loaded expert (load_max_dev) averaged
over the same steps, and the final validation loss.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from experiments.studies.balance import (CANDIDATES, PAPER_BALANCE, initial_routing, summarize,
                                         summarize_rate)
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import storage
from sigma_moe_jax.training import run as training
from sigma_moe_jax.training.hooks import RunStopped


_CONFIG = config_flags.DEFINE_config_file(
    "config", cli_lib.project_path("configs/cpu_tiny.py"),
    "Base config of every candidate.", lock_config=True)
_FROM_PAPER = flags.DEFINE_bool(
    "from_paper", True, "Start every candidate from the paper's balance settings (capacity "
    "factor 2, LBL coefficient 1e-3), which the quickstart config had before this search; "
    "false: from --config as it is.")
_CANDIDATES = flags.DEFINE_string("candidates", ",".join(CANDIDATES),
                                  f"Comma-separated, from: {', '.join(CANDIDATES)}.")
_SETTLE = flags.DEFINE_float("settle", 0.1, "Statistics count the logged steps after this "
                             "fraction of the run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs and results.json go here.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  names = [n.strip() for n in _CANDIDATES.value.split(",") if n.strip()]
  unknown = [n for n in names if n not in CANDIDATES]
  if unknown or not names:
    sys.exit(f"error: unknown --candidates {unknown or _CANDIDATES.value!r}; choose from "
             f"{', '.join(CANDIDATES)}")
  workdir = storage.resolve(_WORKDIR.value)
  results_path = storage.join(workdir, "results.json")
  results = json.loads(storage.read_text(results_path)) if storage.exists(results_path) else {}
  try:
    for name in names:
      config = _CONFIG.value.copy_and_resolve_references()
      config.unlock()
      if _FROM_PAPER.value:
        PAPER_BALANCE(config)
      CANDIDATES[name](config)
      run_dir = storage.join(workdir, name)
      print(f"=== {name}", flush=True)
      training.train(config, run_dir)
      results[name] = {"config": {k: config[k].to_dict() for k in ("balance", "schedule")},
                       **initial_routing(config),
                       "model": {k: config.model[k] for k in (
                           "top1_lbl_tau", "init_std", "embed_init_std", "capacity_factor")},
                       "train": {k: config.train[k] for k in ("lr", "warmup_steps",
                                                              "router_lr_scale")},
                       "tokens_per_sec": summarize_rate(storage.join(run_dir, "metrics.jsonl")),
                       **summarize(storage.join(run_dir, "metrics.jsonl"), config.train.steps,
                                   _SETTLE.value)}
      storage.makedirs(workdir)
      storage.write_text(results_path, json.dumps(results, indent=1))
      print(json.dumps({name: results[name]}), flush=True)
  except (ValueError, FileNotFoundError, RunStopped) as e:
    sys.exit(f"error: {e}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
