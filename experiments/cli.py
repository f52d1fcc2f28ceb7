"""What every launcher shares: paths that work from any directory, and the absl entry point.

A relative path that does not exist from the current directory but does from the project root
(the shipped configs, corpus and tokenizer) is taken from the project root, so
`python -m experiments.train --config=experiments/configs/cpu_tiny.py` and the console scripts
work wherever they are started.
"""

from __future__ import annotations

import difflib
import glob
import os
import sys
from typing import Callable

from absl import app

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_path(path: str) -> str:
  """`path` itself, unless it is relative, matches nothing here, and matches from the project root
  (globs and comma-separated lists are resolved part by part)."""
  def one(part: str) -> str:
    part = part.strip()
    if not part or os.path.isabs(part) or "://" in part or glob.glob(part):
      return part
    rooted = os.path.join(PROJECT_ROOT, part)
    return rooted if glob.glob(rooted) else part
  return ",".join(one(p) for p in path.split(",")) if path else path


def run(main: Callable) -> None:
  """absl's app.run with `--config=<file>[:args]` resolved by `project_path`, and a bad config
  file or `--config.<key>` refused in one line before any parsing (ml_collections would raise
  from deep inside absl)."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      file, sep, rest = arg[len("--config="):].partition(":")
      file = project_path(file)
      if not os.path.isfile(file):
        sys.exit(f"error: config file {file!r} not found")
      sys.argv[i] = f"--config={file}{sep}{rest}"
    elif arg.startswith("--config."):
      error = unknown_key_error(arg[len("--config."):].split("=")[0])
      if error:
        sys.exit(f"error: {error}")
  try:
    app.run(main)
  except KeyboardInterrupt:
    sys.exit("error: interrupted")


def unknown_key_error(key: str) -> str:
  """'' when `key` (e.g. "train.steps") is a config key, else a message naming the closest ones."""
  from experiments.configs.base import make_config  # configs import this module
  from sigma_moe_jax import ModelConfig
  reference = make_config(ModelConfig())
  known = [f"{section}.{name}" for section in reference for name in reference[section]]
  if key in known:
    return ""
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = f"; did you mean {close[0]}?" if close else f"; sections: {sorted(reference)}"
  return f"unknown config key {key!r}{hint}"
