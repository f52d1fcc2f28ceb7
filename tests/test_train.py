"""The train step against independent computations: accumulation, loss masking, weight decay,
loss-free bias updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sigma_moe_jax import ModelConfig, TopKSchedule
from sigma_moe_jax.layers import positions_from_segments
from sigma_moe_jax.model import has_layers, stack_layers
from sigma_moe_jax.moe.balancing import update_selection_bias
from sigma_moe_jax.schedule import AdaptiveTopK
from sigma_moe_jax.training import step as train_lib

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=8, d_ff=32, top_k=1, init_std=0.1)


def make_batch(seed, batch=4, seq=16):
  tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size)
  segments = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], batch, axis=0), jnp.int32)
  return {"tokens": tokens, "segment_ids": segments,
          "positions": positions_from_segments(segments)}


def setup(balance, grad_accum=1, cfg=CFG, schedule=None):
  graphdef, params = train_lib.init_model(cfg, 0)
  lr = train_lib.learning_rate_schedule(lr=1e-2, steps=10, warmup_steps=1, kind="cosine")
  optimizer = train_lib.make_optimizer(lr)
  state = train_lib.init_state(params, optimizer, cfg, schedule)
  step = jax.jit(train_lib.make_train_step(graphdef, optimizer, lr, cfg, balance,
                                           schedule=schedule, grad_accum=grad_accum))
  return graphdef, state, step


def next_token_targets(batch):
  """(row, position, next token) of every target, by a plain loop: the next token is one when
  it is not padding and continues the same document."""
  tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
  return [(b, i, tokens[b, i + 1]) for b in range(tokens.shape[0])
          for i in range(tokens.shape[1] - 1)
          if segments[b, i + 1] > 0 and segments[b, i + 1] == segments[b, i]]


def test_lm_loss_masks_document_starts_and_padding():
  batch = make_batch(0, batch=2)
  logits = jax.random.normal(jax.random.key(1), (2, 16, CFG.vocab_size))
  total, count = train_lib.lm_loss_terms(logits, batch["tokens"], batch["segment_ids"])
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  targets = next_token_targets(batch)
  want_total = -sum(log_probs[b, i, token] for b, i, token in targets)
  want_count = len(targets)
  assert int(count) == want_count == 2 * (5 + 6)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)


def test_loss_and_head_gradients_match_the_softmax_formula():
  """The fused cross-entropy and the LM head's custom backward against NumPy: d loss / d logits
  = mask * (softmax - one_hot), d x = d logits @ W^T, d W = x^T @ d logits."""
  from sigma_moe_jax.layers import project
  batch = make_batch(0, batch=2)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 16, 8)))
  w = np.asarray(jax.random.normal(jax.random.key(3), (8, CFG.vocab_size)))

  def loss(x, w):
    return train_lib.lm_loss_terms(project(x, w), batch["tokens"], batch["segment_ids"])[0]

  d_x, d_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  logits = x @ w
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  d_logits = np.zeros_like(logits)
  for b, i, token in next_token_targets(batch):
    d_logits[b, i] = probs[b, i]
    d_logits[b, i, token] -= 1
  np.testing.assert_allclose(d_x, d_logits @ w.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d_w, x.reshape(-1, 8).T @ d_logits.reshape(-1, w.shape[1]),
                             rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_the_whole_batch():
  balance = train_lib.BalanceSettings(loss="none")
  batch = make_batch(2, batch=4)
  _, state, step1 = setup(balance, grad_accum=1)
  _, state2, step2 = setup(balance, grad_accum=2)
  new1, m1 = step1(state, batch)
  new2, m2 = step2(state2, batch)
  np.testing.assert_allclose(m1["lm_loss"], m2["lm_loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new1.params), jax.tree.leaves(new2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_skips_norm_scales():
  lr = optax.constant_schedule(0.1)
  optimizer = train_lib.make_optimizer(lr, weight_decay=0.5)
  _, params = train_lib.init_model(CFG, 0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])
  np.testing.assert_array_equal(new["blocks"]["attn"]["q_norm"]["scale"],
                                params["blocks"]["attn"]["q_norm"]["scale"])
  np.testing.assert_allclose(new["lm_head"], params["lm_head"] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_optimizer_matches_optax_adamw_and_a_skipped_step_keeps_the_moments():
  """make_optimizer against optax's own clip + adamw over three steps (same state structure, same
  parameters), then a step told `finite=False` with a NaN gradient: the moments and Adam's count
  stay bit for bit as they were."""
  lr = train_lib.learning_rate_schedule(lr=1e-2, steps=10, warmup_steps=1, kind="cosine")
  ours = train_lib.make_optimizer(lr, b1=0.8, b2=0.9, weight_decay=0.1, grad_clip=0.5)
  oracle = optax.chain(optax.clip_by_global_norm(0.5),
                       optax.adamw(lr, b1=0.8, b2=0.9, weight_decay=0.1,
                                   mask=train_lib.weight_decay_mask))
  _, params = train_lib.init_model(CFG, 0)
  state, oracle_state = ours.init(params), oracle.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(oracle_state)
  p, q = params, params
  for seed in range(3):
    grads = jax.tree.map(lambda a, k=jax.random.key(seed): jax.random.normal(k, a.shape), params)
    updates, state = ours.update(grads, state, p, finite=jnp.bool_(True))
    oracle_updates, oracle_state = oracle.update(grads, oracle_state, q)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q, oracle_updates)
  for a, b in zip(jax.tree.leaves((p, state)), jax.tree.leaves((q, oracle_state))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  nan_grads = jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan), params)
  _, skipped = ours.update(nan_grads, state, p, finite=jnp.bool_(False))
  adam, skipped_adam = state[1][0], skipped[1][0]
  for a, b in zip(jax.tree.leaves(adam), jax.tree.leaves(skipped_adam)):
    np.testing.assert_array_equal(a, b)


def test_a_non_finite_step_stores_nothing():
  """A batch whose loss is NaN (a NaN in the LM head): the step reports it and returns the
  parameters and Adam's moments and count exactly as they were."""
  graphdef, state, step = setup(train_lib.BalanceSettings())
  state, _ = step(state, make_batch(0))  # non-zero moments to keep
  moments_before = jax.tree.map(np.asarray, state.opt_state[1][0])
  params = {**state.params, "lm_head": state.params["lm_head"].at[0, 0].set(jnp.nan)}
  new, metrics = step(state._replace(params=params), make_batch(1))
  assert not bool(metrics["finite"])
  assert int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((params, moments_before)),
                  jax.tree.leaves((new.params, new.opt_state[1][0]))):
    np.testing.assert_array_equal(a, b)
  assert np.isnan(np.asarray(new.params["lm_head"][0, 0]))  # kept as it was, NaN included
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(new.opt_state[1][0]))


def test_the_per_layer_train_state_takes_the_stacked_states_steps():
  """Unrolled layers train on `per_layer_state`'s layout (the parameters and AdamW moments one
  array per layer): three steps from it match three steps from the stacked state (the weight
  decay and clipping see the same leaves), and stacking it back gives the stacked run's state."""
  cfg = CFG.replace(scan_layers=False)
  _, stacked, step = setup(train_lib.BalanceSettings(), cfg=cfg)
  per_layer, _ = train_lib.per_layer_state(cfg, stacked, None)
  assert has_layers(per_layer.params) and has_layers(per_layer.opt_state)
  for seed in range(3):
    stacked, want = step(stacked, make_batch(seed))
    per_layer, got = step(per_layer, make_batch(seed))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stack_layers(per_layer)),
                          jax.tree.leaves(stacked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert train_lib.per_layer_state(CFG, stacked, None)[0] is stacked  # the scan keeps it stacked


def test_loss_free_bias_follows_the_global_counts():
  cfg = CFG.replace(gate_fn="sigmoid")
  balance = train_lib.BalanceSettings(loss="none", loss_free=True, bias_rate=0.01)
  graphdef, state, step = setup(balance, cfg=cfg)
  batch = make_batch(3)
  model = train_lib.nnx.merge(graphdef, state.params)
  _, stats = model(batch["tokens"], batch["segment_ids"], batch["positions"],
                   selection_bias=state.selection_bias)
  new, _ = step(state, batch)
  want = update_selection_bias(state.selection_bias, stats.counts.tokens_per_expert, 0.01)
  np.testing.assert_allclose(new.selection_bias, want, atol=1e-7)
  assert np.abs(np.asarray(new.selection_bias)).max() == pytest.approx(0.01)


def test_schedule_and_model_must_agree():
  schedule = TopKSchedule.parse([(0, [2, 2]), (5, [1, 1])], num_layers=2)
  with pytest.raises(ValueError, match="max_top_k"):
    setup(train_lib.BalanceSettings(), schedule=schedule)
  _, state, step = setup(train_lib.BalanceSettings(), schedule=schedule,
                         cfg=CFG.replace(max_top_k=schedule.max_top_k))
  _, metrics = step(state, make_batch(4))
  np.testing.assert_array_equal(metrics["top_k"], [2, 2])


def test_adaptive_top_k_changes_in_several_layers_under_one_compilation():
  """The k the step runs with comes from the state the previous step wrote, here lowered in both
  layers by the deadline's ceiling; no change of k compiles again."""
  schedule = AdaptiveTopK(start=(3, 2), target=(1, 1), deadline=4, patience=100)
  _, state, step = setup(train_lib.BalanceSettings(), schedule=schedule,
                         cfg=CFG.replace(max_top_k=schedule.max_top_k))
  batch, seen = make_batch(4), []
  for i in range(6):
    state, metrics = step(state, batch)
    seen.append(np.asarray(metrics["top_k"]).tolist())
    if i == 1:  # the first call's output state is placed differently from the initial one
      compiled = step._cache_size()
    np.testing.assert_array_equal(np.asarray(state.top_k_state["k"]),
                                  np.asarray(schedule.ceiling(i + 1)))
  assert seen == [[3, 2], [3, 2], [2, 2], [2, 2], [1, 1], [1, 1]]
  assert step._cache_size() == compiled


def test_invalid_settings_are_rejected():
  with pytest.raises(ValueError, match="balance.loss"):
    train_lib.BalanceSettings(loss="entropy")
  with pytest.raises(ValueError, match="warmup_steps"):
    train_lib.learning_rate_schedule(lr=1.0, steps=5, warmup_steps=5, kind="cosine")
  with pytest.raises(ValueError, match="learning-rate schedule"):
    train_lib.learning_rate_schedule(lr=1.0, steps=5, warmup_steps=1, kind="linear")


def test_evaluation_routing_adds_up_to_the_whole_set():
  """The routing load that `evaluate` sums over batches equals the load of all of them run as one
  batch (a second code path), and its LBL is Eq. 1 on that f and p."""
  from sigma_moe_jax.training.run import evaluate
  from sigma_moe_jax.infra.sharding import make_mesh
  graphdef, params = train_lib.init_model(CFG, 0)
  eval_step = jax.jit(train_lib.make_eval_step(graphdef))
  top_k = jnp.ones((CFG.num_layers,), jnp.int32)
  batches = [make_batch(seed) for seed in (5, 6, 7)]
  mesh = make_mesh(devices=jax.devices()[:1])
  got = evaluate(eval_step, params, iter(batches), lambda b: b, mesh, top_k, None, max_batches=2)
  whole = jax.tree.map(lambda *a: jnp.concatenate(a), *batches[:2])
  ce, n, routing = eval_step(params, whole, top_k)
  np.testing.assert_array_equal(got["val_tokens_per_expert"], routing.tokens_per_expert)
  assert got["val_targets"] == int(n)
  np.testing.assert_allclose(got["val_loss"], float(ce) / int(n), rtol=1e-5)
  p = np.asarray(routing.gate_prob_sum) / np.asarray(routing.num_tokens)[:, None]
  np.testing.assert_allclose(got["val_p"], p, rtol=1e-5)
  f = np.asarray(routing.tokens_per_expert, np.float64)
  f /= f.sum(-1, keepdims=True)
  lbl = CFG.num_experts * np.sum(f * p, -1)
  np.testing.assert_allclose(got["val_lbl_per_layer"], lbl, rtol=1e-5)
  np.testing.assert_allclose(got["val_lbl"], lbl.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["val_load_max_dev"], f.max(-1) * CFG.num_experts - 1,
                             rtol=1e-5)


def test_evaluation_is_dropless_whatever_the_training_capacity():
  """With a capacity that drops tokens in training, evaluation drops none and gives the loss of
  the dense oracle (every token through its experts)."""
  from sigma_moe_jax.training.run import dropless_eval_step, evaluate
  from sigma_moe_jax.infra.sharding import make_mesh
  cfg = CFG.replace(capacity_factor=0.25)
  graphdef, params = train_lib.init_model(cfg, 0)
  top_k = jnp.ones((cfg.num_layers,), jnp.int32)
  batches = [make_batch(seed) for seed in (5, 6)]
  whole = jax.tree.map(lambda *a: jnp.concatenate(a), *batches)
  _, _, training_routing = jax.jit(train_lib.make_eval_step(graphdef))(params, whole, top_k)
  assert int(np.sum(training_routing.dropped)) > 0  # the training capacity does drop here
  got = evaluate(jax.jit(dropless_eval_step(cfg)), params, iter(batches), lambda b: b,
                 make_mesh(devices=jax.devices()[:1]), top_k, None, max_batches=2)
  np.testing.assert_array_equal(got["val_drop_fraction"], [0.0, 0.0])
  dense = train_lib.model_graphdef(cfg.replace(dispatch="dense", capacity_factor=None))
  ce, n, _ = jax.jit(train_lib.make_eval_step(dense))(params, whole, top_k)
  np.testing.assert_allclose(got["val_loss"], float(ce) / int(n), rtol=1e-5)


def test_router_lr_scale_scales_only_the_router_updates():
  params = train_lib.init_model(CFG, 0)[1]
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  lr = train_lib.learning_rate_schedule(lr=1e-2, steps=10, warmup_steps=1, kind="cosine")
  updates = {}
  for scale in (1.0, 0.1):
    optimizer = train_lib.make_optimizer(lr, router_lr_scale=scale)
    updates[scale], _ = optimizer.update(grads, optimizer.init(params), params)
  for path, full in jax.tree_util.tree_leaves_with_path(updates[1.0]):
    scaled = np.asarray(dict(jax.tree_util.tree_leaves_with_path(updates[0.1]))[path])
    factor = 0.1 if "router" in jax.tree_util.keystr(path) else 1.0
    np.testing.assert_allclose(scaled, factor * np.asarray(full), rtol=1e-6, atol=1e-12)


def test_embed_init_std_sets_the_embeddings_alone():
  params = train_lib.init_model(CFG.replace(vocab_size=512, embed_init_std=1.0), 0)[1]
  assert np.std(np.asarray(params["embed"])) == pytest.approx(1.0, rel=0.02)
  assert np.std(np.asarray(params["lm_head"])) == pytest.approx(CFG.init_std, rel=0.05)
