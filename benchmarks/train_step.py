"""Train-step throughput of a preset: tokens/s and model FLOPs utilisation against the device's
own float32 matmul rate, measured in the same run.

  python -m benchmarks.train_step [--preset cpu_tiny --batch 8 --seq 128]
"""

import argparse

from benchmarks.common import random_batch, time_interleaved, train_step_call
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.infra.metrics import flops_per_token, measure_matmul_flops

PRESETS = {"cpu_tiny": ModelConfig.cpu_tiny, "gpu_small": ModelConfig.gpu_small}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="cpu_tiny", choices=sorted(PRESETS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  cfg = PRESETS[args.preset]()
  matmul = measure_matmul_flops()
  (seconds,) = time_interleaved(
      [train_step_call(cfg, random_batch(args.batch, args.seq, cfg.vocab_size))],
      repeats=args.repeats)
  tokens = args.batch * args.seq
  model_flops = flops_per_token(cfg, args.seq) * tokens / seconds
  print(f"{args.preset}, {args.batch}x{args.seq} tokens per step, float32")
  print(f"matmul rate (1024^3, float32)  {matmul / 1e9:8.1f} GFLOP/s")
  print(f"train step                     {seconds * 1e3:8.1f} ms")
  print(f"tokens/s                       {tokens / seconds:8.0f}")
  print(f"model FLOP/s                   {model_flops / 1e9:8.1f} GFLOP/s")
  print(f"MFU vs matmul rate             {model_flops / matmul:8.1%}")


if __name__ == "__main__":
  main()
