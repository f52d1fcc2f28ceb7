r"""Trains a Sigma-MoE model.

  python -m sigma_moe_jax.cli.train --config=configs/cpu_tiny.py --workdir=runs/cpu_tiny \
      [--config.train.steps=2000 --config.model.num_experts=64 ...]

Relaunching the same command on a workdir with checkpoints resumes from the latest one. Multi-host
runs call `jax.distributed.initialize()` when the environment describes one (see README).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.training.hooks import RunStopped
from sigma_moe_jax.training.run import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except RunStopped as e:
    if e.storage_failed:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)
    sys.exit(f"error: {e}")
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
