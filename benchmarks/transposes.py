"""How fast XLA:CPU transposes an activation, depending on what the transpose is fused with: a
plain array, a dynamic slice of a stacked array (what a layer scan's backward reads its saved
activations from), and inside a scan over the stack (the layer scan itself). Each `[T, d]`
float32 transpose feeds nothing but an optimisation barrier; a plain copy of the same bytes is
the yardstick. Timed in alternation.

  python -m benchmarks.transposes [--tokens 4096 --width 512 --layers 4]
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import time_interleaved


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=20)
  a = parser.parse_args()
  keep = jax.lax.optimization_barrier
  stack = jax.random.normal(jax.random.key(0), (a.layers, a.tokens, a.width))
  plain = stack[1] + 0
  index = jnp.int32(a.layers // 2)
  cases = {
      "copy of one layer": lambda stack, plain, i: keep(plain * 2),
      "transpose of one layer": lambda stack, plain, i: keep(plain.T),
      "transpose of a dynamic slice": lambda stack, plain, i: keep(
          jax.lax.dynamic_index_in_dim(stack, i, keepdims=False).T),
      "per layer, inside a scan": lambda stack, plain, i: jax.lax.scan(
          lambda carry, layer: (carry, keep(layer.T)), 0.0, stack)[1],
  }
  calls = [jax.jit(f) for f in cases.values()]
  seconds = time_interleaved([lambda f=f: f(stack, plain, index) for f in calls],
                             repeats=a.repeats)
  print(f"[{a.tokens}, {a.width}] float32 ({a.tokens * a.width * 4 / 2**20:.0f} MiB), "
        f"{a.layers} layers in the stack")
  base = seconds[0]
  for name, s in zip(cases, seconds):
    per = s / a.layers if name.startswith("per layer") else s
    print(f"{name:32s} {per * 1e3:7.2f} ms per layer  ({per / base:5.1f}x the copy)")


if __name__ == "__main__":
  main()
