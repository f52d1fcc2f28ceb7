"""Forward + backward time of one MoE layer per dispatch strategy against a dense SwiGLU FFN of
the same activated size, measured side by side in one run.

  python -m benchmarks.moe_layer [--tokens 8192] [--experts 96] [--strategies padded,ragged,dense]
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import time_interleaved
from sigma_moe_jax.moe import MoE


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--experts", type=int, default=96)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=256)
  parser.add_argument("--top_k", type=int, default=1)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--strategies", default="padded,ragged,dense")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()

  d, f, t = args.d_model, args.d_ff, args.tokens
  x = jax.random.normal(jax.random.key(0), (1, t, d), jnp.float32)
  token_mask = jnp.ones((1, t), bool)

  # The dense baseline: one SwiGLU FFN with the activated expert's size.
  keys = jax.random.split(jax.random.key(1), 3)
  ffn = (0.02 * jax.random.normal(keys[0], (d, f)), 0.02 * jax.random.normal(keys[1], (d, f)),
         0.02 * jax.random.normal(keys[2], (f, d)))

  @jax.jit
  def ffn_step(weights, x):
    def loss(weights, x):
      w_gate, w_up, w_down = weights
      return jnp.sum((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down)
    return jax.grad(loss, argnums=(0, 1))(weights, x)

  def moe_call(strategy):
    capacity = args.capacity_factor if strategy == "padded" else None
    moe = MoE(d, f, args.experts, gate_fn="softmax", renormalize=False, dispatch=strategy,
              capacity_factor=capacity, init_std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(moe)

    @jax.jit
    def moe_step(params, x):
      def loss(params, x):
        y, stats = nnx.merge(graphdef, params)(x, jnp.int32(args.top_k), args.top_k, token_mask)
        return jnp.sum(y) + jnp.sum(stats.gate_prob_mean)
      return jax.grad(loss, argnums=(0, 1))(params, x)

    return lambda: moe_step(params, x)

  strategies = args.strategies.split(",")
  fast = [s for s in strategies if s == "padded"]
  slow = [s for s in strategies if s != "padded"]
  # The fast paths are timed in alternation with the dense FFN. The slow ones (ragged on CPU,
  # dense) take seconds and disturb whatever runs after them, so they are timed on their own
  # and compared with the same baseline.
  baseline, *fast_seconds = time_interleaved(
      [lambda: ffn_step(ffn, x)] + [moe_call(s) for s in fast], repeats=args.repeats)
  slow_seconds = [time_interleaved([moe_call(s)], repeats=3, warmup=1)[0] for s in slow]
  print(f"{t} tokens, {args.experts} experts, top-{args.top_k}, d_model {d}, d_ff {f}, "
        f"capacity factor {args.capacity_factor} (padded), {jax.devices()[0].platform}")
  print(f"{'dense_ffn':10s} {baseline * 1e3:8.1f} ms   1.00x")
  for strategy, s in zip(fast + slow, fast_seconds + slow_seconds):
    print(f"{strategy:10s} {s * 1e3:8.1f} ms   {s / baseline:.2f}x")

if __name__ == "__main__":
  main()
