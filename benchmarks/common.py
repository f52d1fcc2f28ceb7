"""Timing helpers shared by the benchmarks."""

import time

import jax
import jax.numpy as jnp
from flax import nnx

from sigma_moe_jax.layers import positions_from_segments
from sigma_moe_jax.moe.layer import MoE, MoEConfig
from sigma_moe_jax.training import step as train_lib


def time_interleaved(calls, repeats: int = 10, warmup: int = 2, untimed_first: bool = False):
  """Median seconds of each zero-argument call, timed in alternation so that drift in the
  machine's speed affects every call alike. With `untimed_first`, each timed call follows an
  untimed one of the same call: when the calls come from different libraries (ours against
  PyTorch), a call right after the other library's finds that library's threads still spinning
  for work (PyTorch's OpenMP threads spin for milliseconds after each parallel region: an XLA
  matmul of 5 ms took 10.5 ms right after a PyTorch one and 6.2 ms 5 ms later), and the untimed
  call absorbs that."""
  for call in calls:
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = [[] for _ in calls]
  for _ in range(repeats):
    for call, record in zip(calls, times):
      if untimed_first:
        jax.block_until_ready(call())
      start = time.perf_counter()
      jax.block_until_ready(call())
      record.append(time.perf_counter() - start)
  return [sorted(t)[len(t) // 2] for t in times]


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)
  segments = jnp.ones_like(tokens)
  return {"tokens": tokens, "segment_ids": segments,
          "positions": positions_from_segments(segments)}


def train_step_call(cfg, batch, *, schedule=None, with_hlo: bool = False):
  """A zero-argument call running one jitted train step (AdamW, global-batch LBL) on `batch`,
  as the trainer runs it: the state is donated to the step and the next call continues from the
  state it returns (no fresh output buffers each step). With `with_hlo`, (the call, the
  compiled step's HLO text)."""
  graphdef, params = train_lib.init_model(cfg, 0)
  lr = train_lib.learning_rate_schedule(lr=1e-3, steps=10**6, warmup_steps=10, kind="wsd")
  optimizer = train_lib.make_optimizer(lr)
  # As the trainer runs it: with the layers unrolled, their parameters are held per layer.
  state, _ = train_lib.per_layer_state(cfg, train_lib.init_state(params, optimizer, cfg), None)
  if schedule is not None:  # time the step at the schedule's last phase
    state = state._replace(step=jnp.asarray(schedule.starts[-1], jnp.int32))
  step = jax.jit(train_lib.make_train_step(graphdef, optimizer, lr, cfg,
                                           train_lib.BalanceSettings(), schedule=schedule),
                 donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  carried = [state]

  def call():
    carried[0], metrics = compiled(carried[0], batch)
    return metrics
  return (call, compiled.as_text()) if with_hlo else call


def dense_ffn_call(x, d_ff: int):
  """A zero-argument call: forward + backward of a dense SwiGLU FFN of width d_ff on x
  [1, tokens, d_model] (the baseline an MoE layer of the same activated size is held to)."""
  d = x.shape[-1]
  keys = jax.random.split(jax.random.key(1), 3)
  weights = tuple((0.02 * jax.random.normal(k, s)).astype(x.dtype)
                  for k, s in zip(keys, [(d, d_ff), (d, d_ff), (d_ff, d)]))

  @jax.jit
  def step(weights, x):
    def loss(weights, x):
      w_gate, w_up, w_down = weights
      return jnp.sum(((jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(weights, x)
  return lambda: step(weights, x)


def moe_layer_call(x, d_ff: int, experts: int, top_k: int, **moe_settings):
  """A zero-argument call: forward + backward of one MoE layer on x [1, tokens, d_model];
  `moe_settings` are MoE arguments (dispatch, capacity_factor, grouped_matmul, ...)."""
  token_mask = jnp.ones(x.shape[:2], bool)
  moe = MoE(MoEConfig(x.shape[-1], d_ff, experts, init_std=0.02, dtype=str(x.dtype),
                      **moe_settings), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(moe)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, stats = nnx.merge(graphdef, params)(x, jnp.int32(top_k), top_k, token_mask)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(stats.counts.gate_prob_sum)
    return jax.grad(loss, argnums=(0, 1))(params, x)
  return lambda: step(params, x)
