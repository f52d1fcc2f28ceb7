"""Sharded training on 8 fake CPU devices equals the single-device result; parameters are placed
as the logical-axis rules say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.layers import positions_from_segments
from sigma_moe_jax.training import step as train_lib

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=8, d_ff=16, top_k=1, init_std=0.2, capacity_factor=None)
MESHES = [dict(data=8), dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)]


def batch():
  tokens = jax.random.randint(jax.random.key(7), (8, 16), 0, CFG.vocab_size)
  segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 6], 8, axis=0), jnp.int32)
  return {"tokens": tokens, "segment_ids": segments,
          "positions": positions_from_segments(segments)}


@functools.lru_cache(maxsize=None)
def setup():
  graphdef, params = train_lib.init_model(CFG, 0)
  lr = optax.constant_schedule(1e-2)
  optimizer = train_lib.make_optimizer(lr)
  state = train_lib.init_state(params, optimizer, CFG)
  step = train_lib.make_train_step(graphdef, optimizer, lr, CFG, train_lib.BalanceSettings())
  return graphdef, state, step


def loss_and_grads(graphdef):
  def objective(params, batch):
    logits, stats = nnx.merge(graphdef, params)(batch["tokens"], batch["segment_ids"],
                                                batch["positions"])
    ce, n = train_lib.lm_loss_terms(logits, batch["tokens"], batch["segment_ids"])
    lbl = jnp.sum(stats.lbl)
    return ce / n + 1e-3 * lbl, lbl
  return jax.value_and_grad(objective, has_aux=True)


@functools.lru_cache(maxsize=None)
def single_device_result():
  graphdef, state, step = setup()
  (loss, lbl), grads = jax.jit(loss_and_grads(graphdef))(state.params, batch())
  new_state, metrics = jax.jit(step)(state, batch())
  return loss, lbl, grads, new_state, metrics


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_step_equals_single_device(axes):
  mesh = sharding.make_mesh(**{"data": 1, **axes})
  graphdef, state, step = setup()
  want_loss, want_lbl, want_grads, want_state, want_metrics = single_device_result()
  param_shardings = sharding.param_shardings(state.params, mesh)
  state_shardings = sharding.state_shardings(state, param_shardings, mesh)
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
  with jax.set_mesh(mesh):
    sharded_state = jax.device_put(state, state_shardings)
    sharded_batch = jax.device_put(batch(), batch_sharding)
    (loss, lbl), grads = jax.jit(loss_and_grads(graphdef))(sharded_state.params, sharded_batch)
    new_state, metrics = jax.jit(
        step, in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, P())))(sharded_state, sharded_batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(lbl, want_lbl, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
  np.testing.assert_array_equal(metrics["f"], want_metrics["f"])
  # Adam's first step divides each gradient by its own magnitude, which magnifies float noise in
  # near-zero gradients: compare the updated parameters to 1% of the learning rate.
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  for leaf, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(param_shardings)):
    assert leaf.sharding.spec == want.spec


def test_sharded_megablox_gradients_equal_single_device():
  """The TPU grouped matmul (interpret mode) inside the MoE's shard_map, where the varying-axes
  check is off: loss and every gradient on an fsdp x expert x tensor mesh equal one device's."""
  mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
  graphdef, _ = train_lib.init_model(CFG.replace(dispatch="ragged", grouped_matmul="megablox"), 0)
  _, state, _ = setup()
  want_loss, want_lbl, want_grads, _, _ = single_device_result()
  shardings = sharding.param_shardings(state.params, mesh)
  with jax.set_mesh(mesh):
    params = jax.device_put(state.params, shardings)
    (loss, lbl), grads = jax.jit(loss_and_grads(graphdef))(params, jax.device_put(
        batch(), NamedSharding(mesh, sharding.batch_spec(mesh))))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(lbl, want_lbl, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_parameter_shardings_follow_the_rules():
  mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
  _, state, _ = setup()
  specs = sharding.param_specs(state.params, mesh)
  assert specs["blocks"]["moe"]["w_gate"] == P(None, "expert", "fsdp", "tensor")
  assert specs["blocks"]["moe"]["w_down"] == P(None, "expert", "tensor", "fsdp")
  assert specs["blocks"]["moe"]["router"] == P(None, "fsdp", None)
  assert specs["blocks"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["attn"]["wk"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["attn"]["wo"] == P(None, "tensor", None, "fsdp")
  assert specs["embed"] == P("tensor", "fsdp") and specs["lm_head"] == P("fsdp", "tensor")
  assert specs["final_norm"]["scale"] == P(None)
  # A dimension the axis does not divide stays replicated (2 KV heads over tensor = 4), and so
  # does one whose axis has size 1 (fsdp here).
  wide = sharding.make_mesh(data=1, fsdp=1, expert=2, tensor=4)
  assert sharding.param_specs(state.params, wide)["blocks"]["attn"]["wk"] == P(
      None, None, None, None)


@pytest.mark.parametrize("sizes,match", [
    (dict(data=-1, fsdp=-1), "only one axis may be -1"),
    (dict(data=3), "needs 3 devices"),
    (dict(data=-1, expert=3), "do not split"),
    (dict(data=0), "mesh axis data"),
])
def test_bad_meshes_are_rejected(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(**sizes)


def test_residual_stream_is_split_over_the_batch_axes():
  """The residual stream leaves every block split over data, fsdp and expert and replicated over
  tensor, d_model and seq, whatever the weights' placement suggests to XLA."""
  mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
  graphdef, state, _ = setup()
  shardings = sharding.param_shardings(state.params, mesh)
  params = jax.device_put(state.params, shardings)

  def hidden(params, tokens):
    return nnx.merge(graphdef, params).hidden_states(tokens)[0]
  with jax.set_mesh(mesh):
    fn = jax.jit(hidden)
    x = fn(params, batch()["tokens"])
    text = fn.lower(params, batch()["tokens"]).as_text()
  assert x.sharding.is_equivalent_to(NamedSharding(mesh, P(("fsdp", "expert"))), x.ndim)
  # One constraint after the embedding and one in the scanned block body.
  assert text.count("sharding_constraint") >= 2
