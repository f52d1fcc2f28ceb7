"""Timing helpers shared by the benchmarks."""

import time

import jax


def time_fn(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time in seconds of a jitted fn(*args), after compiling and warming up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]
