"""The train step of this checkout against the same step at an earlier git revision, timed in
alternation on the same shapes and tokens: what a change to the library bought, measured side by
side in one run.

  python -m benchmarks.compare_revisions --base HEAD~1 [--shapes cpu_tiny,d512] [--repeats 8]

Each side runs in its own process with its own checkout (the base revision in a temporary git
worktree), so both import their own library; the parent tells them in turn to run one step and
reads back its time. A side builds the step with `benchmarks.peer_train_step.ours` (the shapes
of `peer_train_step.SHAPES`), so the base revision must have it. Prints per shape and layer mode
the median step time of each side and base / this.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

# Runs inside each side's checkout: builds the step, then one timed step per "step" line.
WORKER = """
import sys, time
import numpy as np
from benchmarks.peer_train_step import SHAPES, ours
shape = SHAPES[sys.argv[1]]
tokens = np.random.default_rng(0).integers(0, shape["vocab"], (shape["batch"], shape["seq"]))
call = ours(shape, tokens, scan_layers=sys.argv[2] == "scan")
call(), call()
print("ready", flush=True)
for line in sys.stdin:
  start = time.perf_counter()
  call()
  print(time.perf_counter() - start, flush=True)
"""


def start_side(checkout: str, shape: str, layers: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": checkout, "JAX_PLATFORMS": os.environ.get(
      "JAX_PLATFORMS", "cpu")}
  side = subprocess.Popen([sys.executable, "-c", WORKER, shape, layers], cwd=checkout, env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  if side.stdout.readline().strip() != "ready":
    raise SystemExit(f"the step at {checkout} did not build (see its error above)")
  return side


def timed_step(side: subprocess.Popen) -> float:
  side.stdin.write("step\n")
  side.stdin.flush()
  return float(side.stdout.readline())


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--base", required=True, help="git revision to compare against")
  parser.add_argument("--shapes", default="cpu_tiny,d512")
  parser.add_argument("--layers", default="scan,unrolled", help="scan, unrolled or both")
  parser.add_argument("--repeats", type=int, default=8)
  args = parser.parse_args()
  here = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                        check=True).stdout.strip()
  base = subprocess.run(["git", "rev-parse", "--short", args.base], capture_output=True,
                        text=True, cwd=here)
  if base.returncode:
    raise SystemExit(f"--base: {args.base!r} is not a revision of this repository")
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, cwd=here).stdout.strip()
  print(f"this checkout ({'with uncommitted changes' if dirty else 'clean'}) against "
        f"{base.stdout.strip()}, {args.repeats} alternating steps, median ms")
  print(f"{'shape':20s} {'base ms':>9s} {'this ms':>9s} {'base / this':>12s}")
  with tempfile.TemporaryDirectory() as tmp:
    worktree = os.path.join(tmp, "base")
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", worktree, args.base],
                   cwd=here, check=True)
    try:
      for shape in args.shapes.split(","):
        for layers in args.layers.split(","):
          sides = [start_side(worktree, shape, layers), start_side(here, shape, layers)]
          times = [[], []]
          for _ in range(args.repeats):
            for side, record in zip(sides, times):
              record.append(timed_step(side))
          for side in sides:
            side.stdin.close()
            side.wait()
          base_s, this_s = (float(np.median(t)) for t in times)
          print(f"{shape + ', ' + layers:20s} {base_s * 1e3:9.1f} {this_s * 1e3:9.1f} "
                f"{base_s / this_s:11.2f}x", flush=True)
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=here)


if __name__ == "__main__":
  main()
