"""What every launcher shares: paths that work from any directory, and the absl entry point.

A relative path that does not exist from the current directory but does from the project root
(the shipped configs, corpus and tokenizer) is taken from the project root, so
`python -m experiments.train --config=experiments/configs/cpu_tiny.py` and the console scripts
work wherever they are started.
"""

from __future__ import annotations

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
  """absl's app.run with `--config=<file>[:args]` resolved by `project_path`."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      file, sep, rest = arg[len("--config="):].partition(":")
      sys.argv[i] = f"--config={project_path(file)}{sep}{rest}"
  app.run(main)
