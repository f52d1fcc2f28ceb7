"""Train-step time in phase 2 of a progressive-sparsification schedule (every layer top-1, lower
layers built for max_top_k 8/6/4/2) against the same model built with max_top_k = 1 everywhere.

  python -m benchmarks.top_k_schedule

Masked slots must cost nothing: the target is at most 1.15x.
"""

import argparse

from benchmarks.common import random_batch, time_interleaved, train_step_call
from sigma_moe_jax import ModelConfig, TopKSchedule


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  lower = [8, 8, 6, 6, 4, 4, 2, 2][: args.layers]
  per_layer = f"{lower}+[1]*{args.layers - len(lower)}".replace(" ", "")
  schedule = TopKSchedule.parse([(0, per_layer), (100, f"[1]*{args.layers}")], args.layers)
  base = ModelConfig.cpu_tiny(num_layers=args.layers)
  batch = random_batch(args.batch, args.seq, base.vocab_size)
  top1, phase2 = time_interleaved(
      [train_step_call(base, batch),
       train_step_call(base.replace(max_top_k=schedule.max_top_k), batch, schedule=schedule)],
      repeats=args.repeats)
  print(f"cpu_tiny with {args.layers} layers, {args.batch}x{args.seq} tokens, train step:")
  print(f"{'max_top_k 1 everywhere':34s} {top1 * 1e3:8.1f} ms   1.00x")
  print(f"{'max_top_k ' + str(list(schedule.max_top_k)) + ', k=1':34s} {phase2 * 1e3:8.1f} ms   "
        f"{phase2 / top1:.2f}x")


if __name__ == "__main__":
  main()
