"""Timing helpers shared by the benchmarks."""

import time

import jax
import jax.numpy as jnp

from sigma_moe_jax import train as train_lib
from sigma_moe_jax.layers import positions_from_segments


def time_interleaved(calls, repeats: int = 10, warmup: int = 2):
  """Median seconds of each zero-argument call, timed in alternation so that drift in the
  machine's speed affects every call alike."""
  for call in calls:
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = [[] for _ in calls]
  for _ in range(repeats):
    for call, record in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(call())
      record.append(time.perf_counter() - start)
  return [sorted(t)[len(t) // 2] for t in times]


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)
  segments = jnp.ones_like(tokens)
  return {"tokens": tokens, "segment_ids": segments,
          "positions": positions_from_segments(segments)}


def train_step_call(cfg, batch, *, schedule=None):
  """A zero-argument call running one jitted train step (AdamW, global-batch LBL) on `batch`."""
  graphdef, params = train_lib.init_model(cfg, 0)
  lr = train_lib.learning_rate_schedule(lr=1e-3, steps=10**6, warmup_steps=10, kind="wsd")
  optimizer = train_lib.make_optimizer(lr)
  state = train_lib.init_state(params, optimizer, cfg)
  if schedule is not None:  # time the step at the schedule's last phase
    state = state._replace(step=jnp.asarray(schedule.starts[-1], jnp.int32))
  step = jax.jit(train_lib.make_train_step(graphdef, optimizer, lr, cfg,
                                           train_lib.BalanceSettings(), schedule=schedule))
  return lambda: step(state, batch)
