"""The dispatch strategies against a plain per-expert loop, for outputs and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_moe_jax.moe import dispatch as dispatch_lib
from sigma_moe_jax.moe.layer import MoE, MoEConfig

E, D, F, B, S = 8, 16, 24, 2, 12


def make_moe(strategy, gate_fn="softmax", renormalize=False, capacity_factor=None):
  return MoE(MoEConfig(D, F, E, gate_fn=gate_fn, renormalize=renormalize, dispatch=strategy,
                       capacity_factor=capacity_factor, init_std=0.3), rngs=nnx.Rngs(0))


def loop_oracle(params, x, k, gate_fn, renormalize):
  """Routing by a full argsort, then one expert at a time over the tokens that chose it."""
  tokens = x.reshape(-1, D)
  logits = tokens @ params["router"]
  scores = jax.nn.softmax(logits) if gate_fn == "softmax" else jax.nn.sigmoid(logits)
  ranked = jnp.argsort(-jax.lax.stop_gradient(scores), axis=-1)[:, :k]  # [T, k]
  weights = jnp.take_along_axis(scores, ranked, axis=-1)
  if renormalize:
    weights = weights / weights.sum(-1, keepdims=True)
  y = jnp.zeros_like(tokens)
  for e in range(E):
    w_e = jnp.sum(jnp.where(ranked == e, weights, 0.0), axis=-1)  # [T]
    h = jax.nn.silu(tokens @ params["w_gate"][e]) * (tokens @ params["w_up"][e])
    y = y + w_e[:, None] * (h @ params["w_down"][e])
  return y.reshape(x.shape)


def moe_params(moe):
  return {n: getattr(moe, n)[...] for n in ("router", "w_gate", "w_up", "w_down")}


def run_moe(strategy, params, x, k, max_top_k, capacity_factor=None, **kw):
  moe = make_moe(strategy, capacity_factor=capacity_factor, **kw)
  for name, value in params.items():
    getattr(moe, name)[...] = value
  return moe(x, jnp.int32(k), max_top_k, jnp.ones(x.shape[:2], bool))


@pytest.mark.parametrize("gate_fn,k,max_top_k,renormalize", [
    ("softmax", 1, 1, False),
    ("sigmoid", 1, 1, False),
    ("softmax", 2, 2, True),
    ("softmax", 2, 4, False),  # traced k below the static max_top_k: slots 2, 3 masked
    ("sigmoid", 3, 4, True),
])
def test_strategies_match_loop_oracle(gate_fn, k, max_top_k, renormalize):
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  params = moe_params(make_moe("dense"))
  target = jax.random.normal(jax.random.key(2), (B, S, D))

  def oracle_loss(params, x):
    return jnp.sum(loop_oracle(params, x, k, gate_fn, renormalize) * target)

  want_loss, want_grads = jax.jit(jax.value_and_grad(oracle_loss, argnums=(0, 1)))(params, x)
  for strategy in ("dense", "padded", "ragged"):
    def loss(params, x):
      y, stats = run_moe(strategy, params, x, k, max_top_k, gate_fn=gate_fn,
                         renormalize=renormalize)
      return jnp.sum(y * target), stats

    (got_loss, stats), got_grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=strategy)
    assert int(stats.counts.dropped) == 0
    assert int(stats.counts.tokens_per_expert.sum()) == B * S * k
    for name in params:
      np.testing.assert_allclose(got_grads[0][name], want_grads[0][name], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{strategy} d/d{name}")
    np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-4, atol=1e-5,
                               err_msg=f"{strategy} d/dx")


def test_padded_drops_over_capacity_like_a_first_come_queue():
  """Each expert keeps its first `capacity` assignments in (token, slot) order; the rest are
  dropped, contribute zero, and are counted."""
  rng = np.random.default_rng(0)
  tokens, slots, capacity = 40, 2, 3
  x = jnp.asarray(rng.normal(size=(tokens, D)), jnp.float32)
  ids = np.stack([rng.choice(E, size=slots, replace=False) for _ in range(tokens)])
  weights = rng.uniform(size=(tokens, slots)).astype(np.float32)
  valid = np.ones((tokens, slots), bool)
  valid[::5, 1] = False
  experts = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) * 0.3
                  for s in ((E, D, F), (E, D, F), (E, F, D)))
  y, dropped = dispatch_lib.padded(x, jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(valid),
                                   experts, capacity)
  seen = np.zeros(E, int)
  keep = np.zeros_like(valid)
  for t in range(tokens):
    for s in range(slots):
      if valid[t, s]:
        keep[t, s] = seen[ids[t, s]] < capacity
        seen[ids[t, s]] += 1
  want, _ = dispatch_lib.dense(x, jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(keep),
                               experts)
  assert int(dropped) == int(valid.sum() - keep.sum()) > 0
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,max_top_k", [(1, 4), (3, 4), (6, 8)])
def test_masked_slots_take_no_capacity_and_no_compute(k, max_top_k):
  """At k under a larger max_top_k the layer computes exactly what a max_top_k = k layer
  computes, including which assignments overflow a tight capacity (sized for k slots)."""
  x = jax.random.normal(jax.random.key(3), (B, S, D))
  params = moe_params(make_moe("dense"))
  run = jax.jit(run_moe, static_argnums=(0, 3, 4, 5))
  y_k, s_k = run("padded", params, x, k, k, 1.0)
  y_max, s_max = run("padded", params, x, k, max_top_k, 1.0)
  assert int(s_k.counts.dropped) > 0
  np.testing.assert_allclose(y_max, y_k, rtol=1e-5, atol=1e-6)
  assert int(s_max.counts.dropped) == int(s_k.counts.dropped)
  np.testing.assert_array_equal(s_max.counts.tokens_per_expert, s_k.counts.tokens_per_expert)


def test_slot_buckets_and_capacity():
  assert dispatch_lib.slot_buckets(1) == (1,)
  assert dispatch_lib.slot_buckets(6) == (1, 2, 3, 4, 5, 6)
  assert dispatch_lib.expert_capacity(100, 1, 10, None) == 100
  assert dispatch_lib.expert_capacity(100, 2, 10, 1.25) == 25


def test_renormalization_never_applies_at_traced_k1():
  """A layer built for max_top_k = 2 running at k = 1 keeps the raw gate weight, so the router still
  gets the LM gradient; at k = 2 the two weights sum to 1."""
  from sigma_moe_jax.moe.routing import route
  logits = jax.random.normal(jax.random.key(4), (6, E))
  probs = jax.nn.softmax(logits)
  at_k1 = route(logits, jnp.int32(1), 2, gate_fn="softmax", renormalize=True)
  np.testing.assert_allclose(at_k1.gate_weights[:, 0], probs.max(-1), rtol=1e-6)
  at_k2 = route(logits, jnp.int32(2), 2, gate_fn="softmax", renormalize=True)
  np.testing.assert_allclose(at_k2.gate_weights.sum(-1), 1.0, rtol=1e-6)
  grad = jax.grad(lambda z: route(z, jnp.int32(1), 2, gate_fn="softmax",
                                  renormalize=True).gate_weights.sum())(logits)
  assert np.abs(np.asarray(grad)).max() > 1e-3
