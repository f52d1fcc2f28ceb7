"""Reproduces the paper's findings at small scale (docs/reproduction.md).

  python -m experiments.reproduce --study=imbalance --workdir=runs/reproduce
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python -m experiments.reproduce --study=domains --workdir=runs/reproduce

--study takes names from experiments/studies/ (comma-separated) or "all". Each study trains the
runs it compares under <workdir>/runs/<variant> (a run another study already trained is reused; an
interrupted one resumes) and writes <workdir>/<study>/results.json and its PNG figures. Config
overrides (--config.train.steps=...) apply to every run of the invocation; a workdir whose run was
made with another config is refused.

--ship=DIR also writes each analysed run, compacted (every evaluation, the per-step series the
studies read, 6 significant digits), to DIR/<variant>.json.gz, and analyses those compacted runs.
--runs_from=DIR trains nothing and analyses the runs shipped in DIR: this is how every number in
docs/reproduction.md is recomputed from docs/results/runs/ in seconds:

  python -m experiments.reproduce --study=all --runs_from=docs/results/runs --workdir=/tmp/check
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from experiments import studies
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import storage
from sigma_moe_jax.training.hooks import RunStopped

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli_lib.project_path("configs/reproduce.py"),
    "Base config of every run.", lock_config=True)
_STUDY = flags.DEFINE_string("study", None, f"Studies to run: {', '.join(studies.STUDIES)}, or "
                             "all.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs, results and figures go here.")
_SHIP = flags.DEFINE_string("ship", None, "Also write the analysed runs, compacted, here.")
_RUNS_FROM = flags.DEFINE_string("runs_from", None, "Train nothing: analyse the runs shipped "
                                 "here (by --ship).")
_TRAIN_ONLY = flags.DEFINE_list("train_only", None, "Train (and with --ship, ship) only these "
                                "variants of the selected studies, and analyse nothing: adds "
                                "runs to a shipped set that --runs_from then analyses whole.")
flags.mark_flags_as_required(["study", "workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  workdir = storage.resolve(_WORKDIR.value)
  try:
    names = studies.selected_studies(_STUDY.value)
    if _RUNS_FROM.value and _SHIP.value:
      raise ValueError("--runs_from and --ship exclude each other")
    order = studies.variant_order(names)
    if _TRAIN_ONLY.value:
      if _RUNS_FROM.value:
        raise ValueError("--train_only and --runs_from exclude each other")
      unknown = sorted(set(_TRAIN_ONLY.value) - set(order))
      if unknown:
        raise ValueError(f"--train_only names {unknown}, not variants of --study "
                         f"{_STUDY.value!r} ({', '.join(order)})")
      # A run that starts from phase 1's checkpoint has its phase 1 run trained here too.
      order = studies.variant_order(names, _TRAIN_ONLY.value)
    if not _RUNS_FROM.value:
      configs = {v: studies.train_variant(_CONFIG.value, v, workdir) for v in order}
    if _SHIP.value:
      storage.makedirs(storage.resolve(_SHIP.value))

    def load(variant):
      """The run the analyses read: shipped, or trained (and, with --ship, compacted)."""
      if _RUNS_FROM.value:
        return studies.read_shipped(storage.join(storage.resolve(_RUNS_FROM.value),
                                                 f"{variant}.json.gz"))
      run = studies.read_run(variant, configs[variant], storage.join(workdir, "runs", variant))
      if not _SHIP.value:
        return run
      path = storage.join(storage.resolve(_SHIP.value), f"{variant}.json.gz")
      studies.write_shipped(studies.compact(run), path)
      return studies.read_shipped(path)

    if _TRAIN_ONLY.value:
      for v in _TRAIN_ONLY.value:
        load(v)
      print(f"=== trained {', '.join(_TRAIN_ONLY.value)}; analyse them with --runs_from",
            flush=True)
      return
    loaded = {}
    for name in names:
      study = studies.STUDIES[name]
      for v in study.variants:
        if v not in loaded:
          loaded[v] = load(v)
      runs = {v: loaded[v] for v in study.variants}
      out = storage.join(workdir, name)
      storage.makedirs(out)
      results, figures = study.analyze(runs, out)
      storage.write_text(storage.join(out, "results.json"),
                         json.dumps({"study": study.title, **results}, indent=1))
      print(f"=== {name}: {study.title}\n{json.dumps(results, indent=1)}\nfigures: "
            f"{', '.join(figures)}", flush=True)
  except (ValueError, FileNotFoundError, RunStopped) as e:
    sys.exit(f"error: {e}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
