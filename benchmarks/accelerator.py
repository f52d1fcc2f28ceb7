"""On a GPU or TPU: one MoE layer per dispatch and kernel against a dense SwiGLU FFN of the same
activated size, and the gpu_small train step's tokens/s and MFU against the chip's peak; one table,
every figure measured side by side in one run.

  python -m benchmarks.accelerator                 # on the accelerator
  python -m benchmarks.accelerator --small         # the same program at toy sizes (CPU check)
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import (dense_ffn_call, moe_layer_call, random_batch, time_interleaved,
                               train_step_call)
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.infra import platform
from sigma_moe_jax.infra.metrics import flops_per_token, peak_flops_per_device


def moe_layer_rows(tokens, experts, d, f, dtype, repeats):
  """[(name, seconds)] for the dense FFN and each MoE variant, forward + backward."""
  x = jax.random.normal(jax.random.key(0), (1, tokens, d), dtype)
  moe_call = lambda dispatch, grouped_matmul, capacity_factor: moe_layer_call(
      x, f, experts, 1, dispatch=dispatch, grouped_matmul=grouped_matmul,
      capacity_factor=capacity_factor)

  target = platform.current()
  variants = [("ragged, auto kernel", ("ragged", "auto", None)),
              ("padded, capacity 1.25", ("padded", "auto", 1.25))]
  seconds = time_interleaved([dense_ffn_call(x, f)]
                             + [moe_call(*args) for _, args in variants], repeats=repeats)
  rows = [("dense FFN (activated size)", seconds[0])]
  rows += [(name, s) for (name, _), s in zip(variants, seconds[1:])]
  # XLA's ragged_dot lowers densely on GPUs: slow, so timed on its own, fewer repeats.
  if target.platform != "cpu":
    rows.append(("ragged, XLA ragged_dot", time_interleaved(
        [moe_call("ragged", "xla", None)], repeats=3, warmup=1)[0]))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--small", action="store_true", help="toy sizes, for a CPU check")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  device = jax.devices()[0]
  dtype = jnp.float32 if args.small else jnp.bfloat16
  if args.small:
    tokens, experts, d, f = 1024, 8, 128, 128
    cfg, batch, seq = ModelConfig.cpu_tiny(), 4, 128
  else:
    tokens, experts, d, f = 16384, 96, 1024, 512
    cfg, batch, seq = ModelConfig.gpu_small(dtype="bfloat16", dispatch="ragged"), 8, 2048

  print(f"{device.device_kind} ({device.platform}), {jnp.dtype(dtype).name}")
  rows = moe_layer_rows(tokens, experts, d, f, dtype, args.repeats)
  baseline = rows[0][1]
  print(f"\nMoE layer, forward + backward: {tokens} tokens, {experts} experts, top-1, "
        f"d_model {d}, d_ff {f}")
  print("| variant | time | ratio to dense FFN |\n|---|---|---|")
  for name, seconds in rows:
    print(f"| {name} | {seconds * 1e3:.2f} ms | {seconds / baseline:.2f}x |")

  (step_seconds,) = time_interleaved(
      [train_step_call(cfg, random_batch(batch, seq, cfg.vocab_size))], repeats=args.repeats)
  peak = peak_flops_per_device()
  tokens_per_sec = batch * seq / step_seconds
  mfu = tokens_per_sec * flops_per_token(cfg, seq) / peak
  print(f"\ntrain step ({'cpu_tiny' if args.small else 'gpu_small'}, {batch} x {seq} tokens): "
        f"{step_seconds * 1e3:.1f} ms, {tokens_per_sec:,.0f} tokens/s, MFU {mfu:.1%} of "
        f"{peak / 1e12:.3g} TFLOP/s")


if __name__ == "__main__":
  main()
