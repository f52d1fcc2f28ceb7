"""Load-balancing losses against NumPy formulas, and global-batch LBL across 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sigma_moe_jax.moe.balancing import (MoEStats, RoutingCounts, expert_domain_mutual_information,
                                         gate_prob_mean, load_statistics, routing_metrics,
                                         top1_load_balancing_loss, update_selection_bias)
from sigma_moe_jax.moe.layer import MoE, MoEConfig

E, D, F = 8, 16, 16
BATCH, SEQ = 8, 6


def numpy_lbl(logits, k):
  """Eq. 1 over all rows of logits [tokens, E]."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.argsort(-probs, axis=-1)[:, :k]
  counts = np.bincount(chosen.ravel(), minlength=E)
  f = counts / counts.sum()
  return E * np.sum(f * probs.mean(0))


def numpy_top1_lbl(logits, tau):
  p = np.exp((logits - logits.max(-1, keepdims=True)) / tau)
  p /= p.sum(-1, keepdims=True)
  return E * np.sum(p.mean(0) ** 2) / p.max(-1).mean()


@functools.lru_cache(maxsize=None)
def moe_step(mode, k):
  """Jitted (loss, stats) and gradients of the layer's LBL w.r.t. the router and the input."""
  moe = MoE(MoEConfig(D, F, E, init_std=0.5, lbl_mode=mode, top1_lbl_tau=0.5),
            rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(moe)

  def lbl(params, x):
    _, stats = nnx.merge(graphdef, params)(x, jnp.int32(k), k, jnp.ones(x.shape[:2], bool))
    return stats.lbl, stats

  return params, jax.jit(jax.value_and_grad(lbl, argnums=(0, 1), has_aux=True))


def inputs():
  """A batch whose halves prefer different experts, so that shards route differently."""
  x = np.array(jax.random.normal(jax.random.key(0), (BATCH, SEQ, D)))
  x[: BATCH // 2] += 2.0 * np.asarray(jax.random.normal(jax.random.key(1), (D,)))
  return jnp.asarray(x, jnp.float32)


def logits_of(params, x):
  return np.asarray(x, np.float64) @ np.asarray(params["router"][...], np.float64)


def run_on_mesh(mode, k, mesh):
  params, step = moe_step(mode, k)
  x = inputs()
  if mesh is None:
    return step(params, x), params, x
  with jax.set_mesh(mesh):
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    return step(params, sharded), params, x


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() >= 8, "needs --xla_force_host_platform_device_count=8"
  return Mesh(np.asarray(jax.devices()[:8]), ("data",))


@pytest.mark.parametrize("k", [1, 2])
def test_single_device_lbl_matches_numpy(k):
  ((loss, stats), _), params, x = run_on_mesh("global", k, None)
  logits = logits_of(params, x).reshape(-1, E)
  np.testing.assert_allclose(loss, numpy_lbl(logits, k), rtol=1e-5)
  np.testing.assert_allclose(stats.top1_lbl, numpy_top1_lbl(logits, 0.5), rtol=1e-5)
  assert int(stats.counts.tokens_per_expert.sum()) == BATCH * SEQ * k
  # The first-choice load is the top-1 routing's, whatever k.
  np.testing.assert_array_equal(stats.counts.first_choice,
                                np.bincount(logits.argmax(-1), minlength=E))


def test_global_lbl_on_8_devices_equals_whole_batch_on_one(mesh8):
  (want, want_grads), params, x = run_on_mesh("global", 1, None)
  (got, got_grads), _, _ = run_on_mesh("global", 1, mesh8)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[0], numpy_lbl(logits_of(params, x).reshape(-1, E), 1), rtol=1e-5)
  np.testing.assert_array_equal(got[1].counts.tokens_per_expert, want[1].counts.tokens_per_expert)
  np.testing.assert_allclose(got_grads[0]["router"][...], want_grads[0]["router"][...],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-5, atol=1e-7)


def test_micro_batch_lbl_uses_each_shards_own_counts(mesh8):
  (got, _), params, x = run_on_mesh("micro_batch", 1, mesh8)
  logits = logits_of(params, x)  # [BATCH, SEQ, E]: one sequence per device
  want = np.mean([numpy_lbl(logits[i], 1) for i in range(BATCH)])
  np.testing.assert_allclose(got[0], want, rtol=1e-5)
  global_lbl = numpy_lbl(logits.reshape(-1, E), 1)
  assert abs(float(got[0]) - global_lbl) > 1e-2, "shards route alike: the test proves nothing"


def test_sequence_lbl_is_the_mean_over_sequences():
  ((got, _), _), params, x = run_on_mesh("sequence", 1, None)
  logits = logits_of(params, x)
  np.testing.assert_allclose(got, np.mean([numpy_lbl(s, 1) for s in logits]), rtol=1e-5)


# Four shards of two rows: both rows hold tokens, one does, none does, both do.
ROWS_WITH_TOKENS = np.array([1, 1, 1, 0, 0, 0, 1, 1], bool)


@functools.lru_cache(maxsize=None)
def masked_lbl(mode):
  moe = MoE(MoEConfig(D, F, E, init_std=0.5, lbl_mode=mode, top1_lbl_tau=0.5),
            rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(moe)
  call = lambda x, mask: nnx.merge(graphdef, params)(x, jnp.int32(1), 1, mask)[1]
  return params, jax.jit(call)


def run_masked(mode, mesh):
  params, call = masked_lbl(mode)
  x, mask = inputs(), jnp.asarray(np.repeat(ROWS_WITH_TOKENS[:, None], SEQ, axis=1))
  if mesh is None:
    return call(x, mask), logits_of(params, x)
  with jax.set_mesh(mesh):
    spec = NamedSharding(mesh, P("data"))
    return call(jax.device_put(x, spec), jax.device_put(mask, spec)), logits_of(params, x)


@pytest.fixture(scope="module")
def mesh4():
  return Mesh(np.asarray(jax.devices()[:4]), ("data",))


def test_sequence_lbl_on_a_mesh_is_the_mean_over_all_non_empty_sequences(mesh4):
  one, logits = run_masked("sequence", None)
  four, _ = run_masked("sequence", mesh4)
  want = np.mean([numpy_lbl(logits[i], 1) for i in np.flatnonzero(ROWS_WITH_TOKENS)])
  np.testing.assert_allclose(one.lbl, want, rtol=1e-5)
  np.testing.assert_allclose(four.lbl, want, rtol=1e-5)
  np.testing.assert_allclose(four.top1_lbl, one.top1_lbl, rtol=1e-5)


def test_micro_batch_lbl_skips_shards_without_tokens(mesh4):
  got, logits = run_masked("micro_batch", mesh4)
  shards = [logits[2 * s: 2 * s + 2][ROWS_WITH_TOKENS[2 * s: 2 * s + 2]] for s in range(4)]
  want = np.mean([numpy_lbl(rows.reshape(-1, E), 1) for rows in shards if rows.size])
  np.testing.assert_allclose(got.lbl, want, rtol=1e-5)


def test_top1_lbl_bounds_and_gradients():
  logits = jax.random.normal(jax.random.key(3), (64, E)) * 3.0
  for tau in (1.0, 0.1):
    p = jax.nn.softmax(logits / tau)
    value = top1_load_balancing_loss(p.mean(0), p.max(-1).mean())
    assert float(value) >= 1.0
    np.testing.assert_allclose(value, numpy_top1_lbl(np.asarray(logits, np.float64), tau),
                               rtol=1e-5)

    def loss(logits):
      p = jax.nn.softmax(logits / tau)
      return top1_load_balancing_loss(p.mean(0), p.max(-1).mean())

    assert np.all(np.isfinite(jax.grad(loss)(logits)))
  # One-hot routing with uniform load reaches the minimum, 1.
  one_hot = jax.nn.one_hot(jnp.arange(64) % E, E)
  np.testing.assert_allclose(top1_load_balancing_loss(one_hot.mean(0), one_hot.max(-1).mean()),
                             1.0, atol=1e-6)


def test_loss_free_bias_update_matches_numpy():
  rng = np.random.default_rng(0)
  bias = rng.normal(size=(3, E)).astype(np.float32)
  counts = rng.integers(0, 50, size=(3, E))
  counts[1] = 10  # perfectly balanced layer: no change
  want = bias.copy()
  for layer in range(3):
    mean = counts[layer].mean()
    for i in range(E):
      want[layer, i] += 1e-3 * np.sign(mean - counts[layer, i])
  got = update_selection_bias(jnp.asarray(bias), jnp.asarray(counts), 1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(got[1], bias[1])


def test_routing_metrics_match_numpy():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 100, size=(2, E))
  probs = rng.dirichlet(np.ones(E), size=2).astype(np.float32)
  first = rng.integers(0, 50, (2, E))
  sums = RoutingCounts(tokens_per_expert=jnp.asarray(counts), gate_prob_sum=jnp.asarray(probs * 5),
                       num_tokens=jnp.asarray([5, 5]), dropped=jnp.asarray([3, 0]),
                       first_choice=jnp.asarray(first), router_z_sum=jnp.asarray([0.5, 1.0]))
  metrics = routing_metrics(MoEStats(sums, jnp.asarray([1.1, 1.0]), jnp.asarray([1.5, 1.2])))
  np.testing.assert_allclose(metrics["p"], probs, rtol=1e-5)
  np.testing.assert_allclose(metrics["router_z_loss"], [0.1, 0.2], rtol=1e-5)
  np.testing.assert_allclose(metrics["lbl_per_layer"], [1.1, 1.0], rtol=1e-6)
  f = counts / counts.sum(-1, keepdims=True)
  np.testing.assert_allclose(metrics["load_max_dev"], f.max(-1) * E - 1, rtol=1e-5)
  np.testing.assert_allclose(metrics["first_choice_max_dev"],
                             first.max(-1) / first.sum(-1) * E - 1, rtol=1e-5)
  np.testing.assert_allclose(metrics["load_min_dev"], f.min(-1) * E - 1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["gate_prob_cv"], probs.std(-1) / probs.mean(-1), rtol=1e-4)
  np.testing.assert_allclose(metrics["drop_fraction"], [3 / counts[0].sum(), 0], rtol=1e-5)


def test_count_offset_accumulates_counts_into_f():
  """With the counts of earlier micro-batches added, f is over all micro-batches so far."""
  moe = MoE(MoEConfig(D, F, E, init_std=0.5), rngs=nnx.Rngs(0))
  x = inputs()
  mask = jnp.ones(x.shape[:2], bool)
  first, second = x[:4], x[4:]
  run = jax.jit(lambda x, mask, offset: moe(x, jnp.int32(1), 1, mask, count_offset=offset)[1])
  s1 = run(first, mask[:4], jnp.zeros((E,), jnp.float32))
  s2 = run(second, mask[4:], s1.counts.tokens_per_expert.astype(jnp.float32))
  assert int(s1.counts.tokens_per_expert.sum()) == 4 * SEQ  # a zero offset changes nothing
  counts = np.asarray(s1.counts.tokens_per_expert + s2.counts.tokens_per_expert, np.float64)
  np.testing.assert_allclose(s2.lbl, E * np.sum(counts / counts.sum() * gate_prob_mean(s2.counts)),
                             rtol=1e-5)


def test_load_statistics_lbl_is_eq1_on_the_given_f_and_p():
  rng = np.random.default_rng(2)
  counts = rng.integers(0, 50, size=(3, E))
  probs = rng.dirichlet(np.ones(E), size=3)
  got = load_statistics(jnp.asarray(counts), jnp.asarray(probs, jnp.float32))
  f = counts / counts.sum(-1, keepdims=True)
  np.testing.assert_allclose(got["lbl_per_layer"], E * np.sum(f * probs, -1), rtol=1e-5)
  np.testing.assert_allclose(got["load_cv"], f.std(-1) / f.mean(-1), rtol=1e-4)


def numpy_mutual_information(counts):
  """I(expert; domain) in bits from the joint table P(d, e) = P(d) P(e | d), P(d) uniform."""
  domains = counts.shape[0]
  joint = np.zeros(counts.shape)
  for d in range(domains):
    joint[d] = counts[d] / counts[d].sum() / domains
  p_domain, p_expert = joint.sum(1), joint.sum(0)
  total = 0.0
  for d in range(domains):
    for e in range(counts.shape[1]):
      if joint[d, e] > 0:
        total += joint[d, e] * np.log2(joint[d, e] / (p_domain[d] * p_expert[e]))
  return total


def test_expert_domain_mutual_information_matches_the_joint_table():
  rng = np.random.default_rng(3)
  counts = rng.integers(0, 40, size=(2, 3, E))  # [domains, layers, E]
  counts[0, 1, :3] = 0  # experts one domain never uses
  got = expert_domain_mutual_information(jnp.asarray(counts))
  want = [numpy_mutual_information(counts[:, layer]) for layer in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Same distribution at different volumes: no information; disjoint experts: one bit.
  same = np.stack([counts[0], 3 * counts[0]])
  np.testing.assert_allclose(expert_domain_mutual_information(jnp.asarray(same)), 0, atol=1e-6)
  disjoint = np.zeros((2, 1, E))
  disjoint[0, 0, :4], disjoint[1, 0, 4:] = 5, 7
  np.testing.assert_allclose(expert_domain_mutual_information(jnp.asarray(disjoint)), [1.0],
                             rtol=1e-6)
