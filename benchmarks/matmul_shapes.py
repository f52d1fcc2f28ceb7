"""The train step's own matmuls, XLA:CPU against PyTorch on the same CPU: for a shape of
`peer_train_step`, every matmul the unrolled step runs (forward and backward: the attention
projections, the blockwise attention's per-block products, the experts at the shape's
capacity, the LM head), each timed alone in both libraries in alternation (each timed call after
an untimed one of its own, `common.time_interleaved`), and their total
per step weighted by how often the step runs each. Where XLA's total exceeds PyTorch's by more
than our step trails the peer's, the difference is the GEMM library's, not the program's.

  python -m benchmarks.matmul_shapes [--shapes cpu_tiny,d512] [--repeats 7]

Every product is timed as a plain batched [batch, m, k] x [batch, k, n] matmul with its operands
already laid out; the step also pays for the transposes and fusions around them, which this
leaves out on both sides. A call from Python costs each library a floor that a compiled step
does not pay per matmul (measured here as an 8 x 8 matmul's call); the totals are printed with
and without it.
"""

import argparse
import collections

import numpy as np

from benchmarks.common import time_interleaved
from benchmarks.peer_train_step import SHAPES


def step_matmuls(shape) -> collections.Counter:
  """(batch, m, k, n) -> how many times the unrolled train step runs it (forward, and the input
  and weight gradients of the backward)."""
  tokens, d = shape["batch"] * shape["seq"], shape["d_model"]
  q_width, kv_width = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
  dots = collections.Counter()

  def weight(rows, d_in, d_out, times, batch=1):  # y = x W: forward, dx = dy W^T, dW = x^T dy
    dots[(batch, rows, d_in, d_out)] += times
    dots[(batch, rows, d_out, d_in)] += times
    dots[(batch, d_in, rows, d_out)] += times

  layers = shape["layers"]
  for width in (q_width, kv_width, kv_width):
    weight(tokens, d, width, layers)  # q, k, v
  weight(tokens, q_width, d, layers)  # o
  weight(tokens, d, shape["vocab"], 1)  # LM head
  capacity = int(np.ceil(shape["capacity"] * tokens / shape["experts"]))
  for d_in, d_out in ((d, shape["d_ff"]), (d, shape["d_ff"]), (shape["d_ff"], d)):
    weight(capacity, d_in, d_out, layers, batch=shape["experts"])  # gate, up, down
  # The xla attention: query blocks of S/8 rows, the G query heads of a KV head stacked.
  from sigma_moe_jax.attention import _blocks, query_block
  groups = shape["heads"] // shape["kv_heads"]
  batch, head_dim = shape["batch"] * shape["kv_heads"], shape["head_dim"]
  for start, size in _blocks(shape["seq"], query_block(shape["seq"])):
    rows, keys = groups * size, start + size
    for dot in [(rows, head_dim, keys),  # scores (forward)
                (rows, keys, head_dim),  # weights x values (forward)
                (keys, rows, head_dim),  # dV
                (rows, head_dim, keys),  # dP
                (rows, keys, head_dim),  # dQ
                (keys, rows, head_dim)]:  # dK
      dots[(batch, *dot)] += layers
  return dots


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415
  torch.set_num_threads(2)
  matmul = jax.jit(jnp.matmul)

  def timed(calls):  # median seconds of each call, alternating, each after an untimed one
    return np.array(time_interleaved(calls, repeats=args.repeats, untimed_first=True))

  def pair(batch, m, k, n):  # (jax call, torch call) of one matmul of that shape
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((batch, *s), dtype=np.float32) for s in ((m, k), (k, n)))
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    return [lambda: matmul(ja, jb).block_until_ready(), lambda: torch.matmul(ta, tb)]
  floor = np.median([timed(pair(1, 8, 8, 8)) for _ in range(20)], axis=0)
  print(f"call floor (an 8 x 8 matmul): jax {floor[0] * 1e6:.0f} us, torch "
        f"{floor[1] * 1e6:.0f} us")
  for name in args.shapes.split(","):
    dots = step_matmuls(SHAPES[name])
    print(f"{name}: {len(dots)} distinct matmuls, {sum(dots.values())} per step")
    print(f"{'batch x m x k x n':>24s} {'per step':>9s} {'jax ms':>8s} {'torch ms':>9s} "
          f"{'jax GFLOP/s':>12s} {'torch GFLOP/s':>14s}")
    totals, flops_total = np.zeros(2), 0
    for (batch, m, k, n), count in sorted(dots.items(), key=lambda kv: -np.prod(kv[0]) * kv[1]):
      seconds = timed(pair(batch, m, k, n))
      flops = 2 * batch * m * k * n
      totals += count * seconds
      flops_total += count * flops
      print(f"{f'{batch} x {m} x {k} x {n}':>24s} {count:9d} {seconds[0] * 1e3:8.2f} "
            f"{seconds[1] * 1e3:9.2f} {flops / seconds[0] / 1e9:12.0f} "
            f"{flops / seconds[1] / 1e9:14.0f}", flush=True)
    print(f"{name}: the step's matmuls ({flops_total / 1e9:.1f} GFLOP) take {totals[0] * 1e3:.1f} "
          f"ms in XLA and {totals[1] * 1e3:.1f} ms in PyTorch: XLA / PyTorch "
          f"{totals[0] / totals[1]:.2f}x, a difference of {(totals[0] - totals[1]) * 1e3:.1f} ms")
    net = totals - sum(dots.values()) * floor
    print(f"{name}: less the call floors, {net[0] * 1e3:.1f} ms against {net[1] * 1e3:.1f} ms: "
          f"{net[0] / net[1]:.2f}x, a difference of {(net[0] - net[1]) * 1e3:.1f} ms\n",
          flush=True)


if __name__ == "__main__":
  main()
