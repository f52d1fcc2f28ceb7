"""Forward + backward time of one MoE layer per dispatch strategy against a dense SwiGLU FFN of
the same activated size, measured side by side in one run.

  python -m benchmarks.moe_layer [--tokens 8192] [--experts 96] [--strategies padded,ragged,dense]
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import dense_ffn_call, moe_layer_call, time_interleaved


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

  def moe_call(strategy):
    capacity = args.capacity_factor if strategy == "padded" else None
    return moe_layer_call(x, f, args.experts, args.top_k, dispatch=strategy,
                          capacity_factor=capacity)

  strategies = args.strategies.split(",")
  fast = [s for s in strategies if s == "padded"]
  slow = [s for s in strategies if s != "padded"]
  # The fast paths are timed in alternation with the dense FFN. The slow ones (ragged on CPU,
  # dense) take seconds and disturb whatever runs after them, so they are timed on their own
  # and compared with the same baseline.
  baseline, *fast_seconds = time_interleaved(
      [dense_ffn_call(x, f)] + [moe_call(s) for s in fast], repeats=args.repeats)
  slow_seconds = [time_interleaved([moe_call(s)], repeats=3, warmup=1)[0] for s in slow]
  print(f"{t} tokens, {args.experts} experts, top-{args.top_k}, d_model {d}, d_ff {f}, "
        f"capacity factor {args.capacity_factor} (padded), {jax.devices()[0].platform}")
  print(f"{'dense_ffn':10s} {baseline * 1e3:8.1f} ms   1.00x")
  for strategy, s in zip(fast + slow, fast_seconds + slow_seconds):
    print(f"{strategy:10s} {s * 1e3:8.1f} ms   {s / baseline:.2f}x")

if __name__ == "__main__":
  main()
