"""Reproduces the paper's findings at small scale (docs/reproduction.md).

  python -m experiments.reproduce --study=imbalance --workdir=runs/reproduce
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python -m experiments.reproduce --study=domains --workdir=runs/reproduce

--study takes names from experiments/studies.py (comma-separated) or "all". Each study trains the
runs it compares under <workdir>/runs/<variant> (a run another study already trained is reused; an
interrupted one resumes) and writes <workdir>/<study>/results.json and its PNG figures. Config
overrides (--config.train.steps=...) apply to every run of the invocation; a workdir whose run was
made with another config is refused.
"""

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments import studies
from experiments.training import run

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/reproduce.py", "Base config of every run.", lock_config=True)
_STUDY = flags.DEFINE_string("study", None, f"Studies to run: {', '.join(studies.STUDIES)}, or "
                             "all.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Runs, results and figures go here.")
flags.mark_flags_as_required(["study", "workdir"])


def selected_studies(spec: str):
  names = list(studies.STUDIES) if spec.strip() == "all" else [
      s.strip() for s in spec.split(",") if s.strip()]
  unknown = [n for n in names if n not in studies.STUDIES]
  if unknown or not names:
    raise ValueError(f"unknown --study {unknown or spec!r}; choose from "
                     f"{', '.join(studies.STUDIES)} or all")
  return names


def variant_order(names):
  """Variants of the selected studies, each once, with phase1 before progressive."""
  wanted = {v for n in names for v in studies.STUDIES[n].variants}
  if "progressive" in wanted:
    wanted.add("phase1")
  return [v for v in studies.VARIANTS if v in wanted]


def check_devices(config, name: str):
  sizes = [config.mesh[axis] for axis in ("data", "fsdp", "expert", "tensor")]
  count = 1
  for size in sizes:
    count *= size
  if -1 not in sizes and count != jax.device_count():
    raise ValueError(
        f"run {name!r} splits each batch over {count} devices and this process has "
        f"{jax.device_count()}; on CPU, start it with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")


def train_variant(base, name: str, workdir: str):
  """Trains (or resumes, or reuses) one variant; returns its config."""
  config = studies.variant_config(base, name, workdir)
  run_dir = os.path.join(workdir, "runs", name)
  stamp = os.path.join(run_dir, "run_config.json")
  wanted = json.loads(config.to_json())
  if os.path.exists(stamp):
    with open(stamp) as f:
      if json.load(f) != wanted:
        raise ValueError(f"{run_dir} holds a run made with another config; remove it or use "
                         f"another --workdir")
  else:
    os.makedirs(run_dir, exist_ok=True)
    with open(stamp, "w") as f:
      json.dump(wanted, f, indent=1)
  metrics, finished = os.path.join(run_dir, "metrics.jsonl"), False
  if os.path.exists(metrics):
    with open(metrics) as f:
      finished = any(json.loads(line)["step"] == config.train.steps for line in f)
  if not finished:
    check_devices(config, name)
    print(f"=== training {name} in {run_dir}", flush=True)
    run(config, run_dir)
  return config


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    names = selected_studies(_STUDY.value)
    base = _CONFIG.value
    configs = {v: train_variant(base, v, workdir) for v in variant_order(names)}
    for name in names:
      study = studies.STUDIES[name]
      runs = {v: studies.read_run(v, configs[v], os.path.join(workdir, "runs", v))
              for v in study.variants}
      out = os.path.join(workdir, name)
      os.makedirs(out, exist_ok=True)
      results, figures = study.analyze(runs, out)
      with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"study": study.title, **results}, f, indent=1)
      print(f"=== {name}: {study.title}\n{json.dumps(results, indent=1)}\nfigures: "
            f"{', '.join(figures)}", flush=True)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
