"""Trains a Sigma-MoE model.

  python -m experiments.train --config=experiments/configs/cpu_tiny.py --workdir=runs/cpu_tiny \
      [--config.train.steps=2000 --config.model.num_experts=64 ...]

Relaunching the same command on a workdir with checkpoints resumes from the latest one. Multi-host
runs call `jax.distributed.initialize()` when the environment describes one (see README).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli as cli_lib
from experiments.resilience import RunStopped
from experiments.settings import flag_names
from experiments.training import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep the libraries' INFO logging (Orbax saves).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _VERBOSE.value:  # Orbax and grain log every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    with flag_names():
      run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, RunStopped) as e:
    sys.exit(f"error: {e}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
