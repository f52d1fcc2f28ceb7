"""Trains a Sigma-MoE model.

  python -m experiments.train --config=experiments/configs/cpu_tiny.py --workdir=runs/cpu_tiny \
      [--config.train.steps=2000 --config.model.num_experts=64 ...]

Relaunching the same command on a workdir with checkpoints resumes from the latest one. Multi-host
runs call `jax.distributed.initialize()` when the environment describes one (see README).
"""

import os
import sys
import threading

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


def quiet_closed_event_loops():
  """After a failed background save, the storage layer's callbacks reach an asyncio loop that
  the checkpoint library has already closed, and print one traceback each; the failure itself
  is reported once, by the run. Other errors are printed as usual."""
  closed = lambda error: isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
  default_unraisable, default_thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda info: None if closed(info.exc_value) else default_unraisable(info)
  threading.excepthook = lambda args: None if closed(args.exc_value) else default_thread(args)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _VERBOSE.value:
    # Orbax and grain log every save at INFO; a failed background save is logged with its
    # traceback and then raised from the next save, where the run reports it in one line.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
    quiet_closed_event_loops()
  try:
    with flag_names():
      run(_CONFIG.value, _WORKDIR.value)
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
