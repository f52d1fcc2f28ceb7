"""Expert-parallel exchanges on 8 fake devices against the single-device dense oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sigma_moe_jax import ModelConfig, Transformer
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.moe import dispatch, expert_parallel

E, D, F, T, K = 8, 16, 16, 32, 2


def inputs():
  keys = list(jax.random.split(jax.random.key(0), 7))
  x = jax.random.normal(keys[0], (8 * T, D))
  ids = jnp.argsort(jax.random.uniform(keys[1], (8 * T, E)), axis=-1)[:, :K].astype(jnp.int32)
  weights = jax.random.uniform(keys[2], (8 * T, K))
  valid = jax.random.uniform(keys[3], (8 * T, K)) < 0.8
  experts = tuple(0.3 * jax.random.normal(k, s) for k, s in
                  zip(keys[4:], ((E, D, F), (E, D, F), (E, F, D))))
  return x, ids, weights, valid, experts


@pytest.mark.parametrize("exchange,run", [
    ("all_to_all", "padded"), ("ragged_emulated", "padded"),
    # The TPU grouped-matmul kernel (Pallas interpret mode) on the received rows.
    ("all_to_all", "megablox"), ("ragged_emulated", "megablox")])
def test_exchange_matches_dense_oracle_and_gradients(exchange, run):
  mesh = sharding.make_mesh(data=2, expert=4)
  x, ids, weights, valid, experts = inputs()

  def oracle(x, weights, experts):
    return jnp.sum(dispatch.dense(x, ids, weights, valid, experts)[0] ** 2)

  local = (dispatch.padded if run == "padded"
           else functools.partial(dispatch.ragged, backend="megablox"))

  def parallel(x, weights, experts):
    def body(x, ids, weights, valid, experts):
      if exchange == "all_to_all":
        y, _ = expert_parallel.exchange_and_run(
            x, ids, weights, valid, experts, axis="expert", shards=4, num_experts=E,
            dispatch=local, capacity_factor=None)
      else:
        y, _ = expert_parallel.ragged_exchange_and_run(
            x, ids, weights, valid, experts, axis="expert", shards=4, num_experts=E,
            dispatch=local, collective=expert_parallel.emulated_ragged_all_to_all)
      return y
    batch = P(("data", "expert"))
    y = jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, batch, P("expert")),
                      out_specs=batch, check_vma=False)(x, ids, weights, valid, experts)
    return jnp.sum(y ** 2)

  want, want_grads = jax.value_and_grad(oracle, argnums=(0, 1, 2))(x, weights, experts)
  with jax.set_mesh(mesh):
    got, got_grads = jax.jit(jax.value_and_grad(parallel, argnums=(0, 1, 2)))(x, weights,
                                                                              experts)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_overflowing_destination_buffers_are_dropped_and_counted():
  """With a capacity factor, all_to_all buffers are fixed; assignments past them are dropped."""
  mesh = sharding.make_mesh(data=2, expert=4)
  x, _, weights, valid, experts = inputs()
  ids = jnp.zeros((8 * T, K), jnp.int32).at[:, 1].set(1)  # everything to device 0's experts

  def body(x, ids, weights, valid, experts):
    y, dropped = expert_parallel.exchange_and_run(
        x, ids, weights, valid, experts, axis="expert", shards=4, num_experts=E,
        dispatch=dispatch.padded, capacity_factor=1.0)
    return y, jax.lax.psum(dropped, ("data", "expert"))

  batch = P(("data", "expert"))
  with jax.set_mesh(mesh):
    _, dropped = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(batch, batch, batch, batch, P("expert")),
        out_specs=(batch, P())))(x, ids, weights, valid, experts)
  # Oracle: each device sends its first ceil(T*K/4) valid assignments in (token, slot) order;
  # device 0 of each data group then keeps ceil(4*T*K/E) per local expert.
  send_capacity, expert_capacity = int(np.ceil(T * K / 4)), int(np.ceil(4 * T * K / E))
  want = 0
  for group in range(2):
    per_expert = np.zeros(E, int)
    for device in range(4):
      rows = slice((group * 4 + device) * T, (group * 4 + device + 1) * T)
      sent = [int(e) for e, v in zip(np.asarray(ids[rows]).ravel(),
                                     np.asarray(valid[rows]).ravel()) if v]
      want += max(0, len(sent) - send_capacity)
      for e in sent[:send_capacity]:
        per_expert[e] += 1
    want += int(np.maximum(per_expert - expert_capacity, 0).sum())
  assert int(dropped) == want > 0


def test_ragged_all_to_all_is_refused_on_cpu():
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    num_experts=4, d_ff=16, expert_exchange="ragged_all_to_all")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  with jax.set_mesh(sharding.make_mesh(data=4, expert=2)):
    with pytest.raises(ValueError, match="ragged_all_to_all does not run on CPU"):
      model(jnp.zeros((8, 4), jnp.int32))
