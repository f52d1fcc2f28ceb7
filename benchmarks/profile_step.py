"""Where the train step's time goes on this machine: the jitted step run under the JAX profiler,
each executed XLA op's time attributed to a part of the model by the name scope its HLO carries.

  python -m benchmarks.profile_step [--shape cpu_tiny|d512] [--steps 5] [--experts 32] [--unrolled]

Parts: embed, attention (projections, QK-norm, RoPE, the attention itself), norm (the block and
final RMSNorms), router, balancing (LBL and routing statistics), dispatch (sort, gather,
scatter, combine), experts (the expert matmuls), lm_head, loss; each forward and backward
(backward: ops under a transpose of the forward); `update`: everything outside the gradient
(AdamW, clipping, the non-finite guard, metrics). Times are summed over executed ops, which may
overlap on several threads; the step's wall time is printed beside them.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks.peer_train_step import SHAPES

PARTS = ("embed", "attention", "norm", "router", "balancing", "experts", "dispatch", "lm_head",
         "loss")


def op_scopes(hlo_text: str):
  """HLO instruction name -> its op_name metadata (jit/jvp/transpose/... scope path)."""
  scopes = {}
  for line in hlo_text.splitlines():
    found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
    if found:
      scopes[found.group(1)] = found.group(2)
  return scopes


def part_of(op_name: str) -> str:
  if "jvp(" not in op_name and "transpose(" not in op_name:
    return "update"
  direction = "backward" if "transpose(" in op_name else "forward"
  # The innermost scope names the part: experts sit inside dispatch, norms inside attention. A
  # scope reads "/name/" or, as the outermost scope under a transformation, "jvp(name)/".
  found = max((m.start(), p) for p in PARTS
              for m in [None, *re.finditer(rf"[/(]{p}[/)]", op_name)] if m is not None
              ) if re.search(r"[/(](" + "|".join(PARTS) + r")[/)]", op_name) else None
  return f"{found[1] if found else 'other'} ({direction})"


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shape", default="cpu_tiny", choices=sorted(SHAPES))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--experts", type=int, default=0, help="override the expert count")
  parser.add_argument("--verbose", action="store_true", help="the costliest unattributed ops")
  parser.add_argument("--unrolled", action="store_true",
                      help="the layers unrolled (model.scan_layers=False) instead of scanned")
  args = parser.parse_args()
  from benchmarks.peer_train_step import ours
  shape = dict(SHAPES[args.shape])
  if args.experts:
    shape["experts"] = args.experts
  tokens = np.random.default_rng(0).integers(0, shape["vocab"], (shape["batch"], shape["seq"]))
  call, compiled_text = ours(shape, tokens, with_hlo=True, scan_layers=not args.unrolled)
  call(), call()
  start = time.perf_counter()
  for _ in range(args.steps):
    call()
  wall = (time.perf_counter() - start) / args.steps
  scopes = op_scopes(compiled_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        call()
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_part, unknown, other = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
    if op is None or "train_step" not in e["args"].get("hlo_module", ""):
      continue
    seconds = e["dur"] / 1e6 / args.steps
    if op in scopes:
      by_part[part_of(scopes[op])] += seconds
      if part_of(scopes[op]).startswith(("other", "update")):
        other[scopes[op]] += seconds
    else:
      unknown[op] += seconds
      by_part["(no scope)"] += seconds
  total = sum(by_part.values())
  layers = "unrolled" if args.unrolled else "scanned"
  print(f"{args.shape}, {layers}, {shape['experts']} experts, batch {shape['batch']} x "
        f"{shape['seq']}: step {wall * 1e3:.1f} ms wall, {total * 1e3:.1f} ms of op time")
  print(f"{'part':28s} {'ms':>8s} {'share':>7s}")
  for part, seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
    print(f"{part:28s} {seconds * 1e3:8.1f} {seconds / total:7.1%}")
  if args.verbose:
    for name, seconds in other.most_common(15):
      print(f"  {seconds * 1e3:6.1f} ms  {name}")
  if unknown:
    print("ops without a scope: " + ", ".join(f"{op} {s * 1e3:.1f} ms"
                                              for op, s in unknown.most_common(5)))


if __name__ == "__main__":
  main()
