"""What every launcher shares: paths that work from any directory, and the absl entry point.

A relative path that does not exist from the current directory but does from the project root
(the shipped configs, corpus and tokenizer) is taken from the project root, so
`python -m sigma_moe_jax.cli.train --config=configs/cpu_tiny.py` and the console scripts
work wherever they are started.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

from absl import app, flags, logging

from sigma_moe_jax.infra import storage
from sigma_moe_jax.infra.storage import project_path
from sigma_moe_jax.training.run_config import unknown_key

_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep the libraries' INFO logging (Orbax's "
                             "lines at every save and restore).")


def quiet_libraries() -> None:
  """Orbax and grain log every save and restore at INFO, and a failed background save once more
  with its traceback before the next save raises it (where the launcher reports it in one line);
  after such a failure the storage layer's callbacks reach a closed asyncio loop and print a
  traceback each. Only those are silenced; other errors print as usual."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  closed = lambda error: isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
  default_unraisable, default_thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda info: None if closed(info.exc_value) else default_unraisable(info)
  threading.excepthook = lambda args: None if closed(args.exc_value) else default_thread(args)


def run(main: Callable) -> None:
  """absl's app.run with `--config=<file>[:args]` resolved by `project_path`, and a bad config
  file or `--config.<key>` refused in one line before any parsing (ml_collections would raise
  from deep inside absl)."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      file, sep, rest = arg[len("--config="):].partition(":")
      file = project_path(file)
      if not storage.isfile(file):
        sys.exit(f"error: config file {file!r} not found")
      sys.argv[i] = f"--config={file}{sep}{rest}"
    elif arg.startswith("--config."):
      error = unknown_key(arg[len("--config."):].split("=")[0])
      if error:
        sys.exit(f"error: {error}")
  def quiet_main(argv):
    if not _VERBOSE.value:
      quiet_libraries()
    return main(argv)
  try:
    app.run(quiet_main)
  except KeyboardInterrupt:
    sys.exit("error: interrupted")
