"""Whole-model behaviour: dispatch parity, router gradients, causality, packing, token checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sigma_moe_jax import ModelConfig, Transformer
from sigma_moe_jax.layers import positions_from_segments
from sigma_moe_jax.model import Layers, has_layers, stack_layers, unstack_layers

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   num_experts=8, d_ff=32, top_k=1, init_std=0.2)


@functools.lru_cache(maxsize=None)
def model_fns(cfg: ModelConfig):
  """(params, jitted logits fn, jitted loss-and-grad fn) for a config; compiled once per config."""
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def logits_fn(params, tokens, segment_ids):
    return nnx.merge(graphdef, params)(tokens, segment_ids)[0]

  @jax.jit
  def loss_and_grad(params, tokens):
    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return jax.value_and_grad(loss)(params)

  return params, logits_fn, loss_and_grad


def random_tokens(seed, shape, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_dispatch_paths_agree_on_loss_and_every_gradient():
  tokens = random_tokens(0, (2, 16))
  results = {}
  for strategy in ("dense", "padded", "ragged"):
    params, _, loss_and_grad = model_fns(TINY.replace(dispatch=strategy))
    results[strategy] = loss_and_grad(params, tokens)
  want_loss, want_grads = results["dense"]
  for strategy in ("padded", "ragged"):
    loss, grads = results[strategy]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7,
                                 err_msg=f"{strategy} {jax.tree_util.keystr(path)}")


def test_unrolled_layers_equal_the_layer_scan():
  """scan_layers=False (one call per layer) against the scan, over two scan groups (layers with
  another static max top-k): the same loss and every gradient."""
  cfg = TINY.replace(num_layers=3, top_k=1, max_top_k=(2, 1, 1))
  tokens = random_tokens(4, (2, 16))
  params, _, scanned = model_fns(cfg)
  _, _, unrolled = model_fns(cfg.replace(scan_layers=False))
  (want_loss, want_grads), (loss, grads) = scanned(params, tokens), unrolled(params, tokens)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_parameters_held_per_layer_give_the_stacked_results():
  """The unrolled layers' train-state layout (`unstack_layers`: one array per layer) against the
  stacked parameters: the same loss, and gradients per layer that stack into the stacked ones;
  a layer scan given them stacks them first."""
  cfg = TINY.replace(num_layers=3, top_k=1, max_top_k=(2, 1, 1), scan_layers=False)
  tokens = random_tokens(4, (2, 16))
  params, _, loss_and_grad = model_fns(cfg)
  per_layer = unstack_layers(params)
  wq = per_layer["blocks"]["attn"]["wq"][...]
  assert isinstance(wq, Layers) and len(wq) == 3
  assert wq[1].shape == params["blocks"]["attn"]["wq"].shape[1:]
  jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), params)
  (want_loss, want_grads), (loss, grads) = loss_and_grad(params, tokens), loss_and_grad(
      per_layer, tokens)
  assert has_layers(grads)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(stack_layers(grads)),
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9, err_msg=jax.tree_util.keystr(path))
  _, _, scanned = model_fns(cfg.replace(scan_layers=True))
  np.testing.assert_allclose(scanned(per_layer, tokens)[0], want_loss, rtol=1e-6)


@pytest.mark.parametrize("gate_fn", ["softmax", "sigmoid"])
def test_lm_loss_reaches_the_router_at_top1(gate_fn):
  params, _, loss_and_grad = model_fns(TINY.replace(gate_fn=gate_fn))
  _, grads = loss_and_grad(params, random_tokens(1, (2, 16)))
  router_grad = np.asarray(grads["blocks"]["moe"]["router"][...])
  assert router_grad.shape == (TINY.num_layers, TINY.d_model, TINY.num_experts)
  for layer in range(TINY.num_layers):
    assert np.abs(router_grad[layer]).max() > 1e-6, f"layer {layer} router gets no gradient"


def test_causal():
  params, logits_fn, _ = model_fns(TINY)
  tokens = random_tokens(2, (1, 16))
  changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % TINY.vocab_size)
  seg = jnp.ones_like(tokens)
  a, b = logits_fn(params, tokens, seg), logits_fn(params, changed, seg)
  np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-6, atol=1e-6)
  assert np.abs(a[0, 10:] - b[0, 10:]).max() > 1e-4


def test_packed_documents_do_not_see_each_other():
  """A document packed after another gives the same logits as the document alone."""
  params, logits_fn, _ = model_fns(TINY)
  first, second = random_tokens(3, (1, 9)), random_tokens(4, (1, 7))
  packed = jnp.concatenate([first, second], axis=1)
  segments = jnp.asarray([[1] * 9 + [2] * 7])
  alone = jnp.concatenate([second, jnp.zeros((1, 9), jnp.int32)], axis=1)
  alone_segments = jnp.asarray([[1] * 7 + [0] * 9])
  got = logits_fn(params, packed, segments)[0, 9:]
  want = logits_fn(params, alone, alone_segments)[0, :7]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_positions_restart_per_document():
  segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
  want = np.zeros_like(segments)
  for row in range(segments.shape[0]):
    for i in range(1, segments.shape[1]):
      same = segments[row, i] == segments[row, i - 1]
      want[row, i] = want[row, i - 1] + 1 if same else 0
  np.testing.assert_array_equal(positions_from_segments(jnp.asarray(segments)), want)


def test_padding_tokens_are_not_routed():
  model = Transformer(TINY, rngs=nnx.Rngs(0))
  tokens = random_tokens(5, (2, 8))
  segments = jnp.asarray([[1] * 5 + [0] * 3, [1] * 8])
  _, stats = model(tokens, segments)
  np.testing.assert_array_equal(stats.counts.tokens_per_expert.sum(-1), [13] * TINY.num_layers)
  np.testing.assert_array_equal(stats.counts.num_tokens, [13] * TINY.num_layers)


@pytest.mark.parametrize("bad", [-1, TINY.vocab_size])
def test_out_of_range_token_ids_are_rejected(bad):
  model = Transformer(TINY, rngs=nnx.Rngs(0))
  tokens = np.zeros((1, 4), np.int32)
  tokens[0, 2] = bad
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
    model(jnp.asarray(tokens))


def test_blocks_take_their_configs_and_the_old_keyword_calls_say_what_to_write():
  from sigma_moe_jax.layers import Attention
  from sigma_moe_jax.moe.layer import MoE
  moe = MoE(TINY.moe_config, rngs=nnx.Rngs(0))
  attn = Attention(TINY.attention_config, rngs=nnx.Rngs(0))
  assert moe.w_gate.shape == (TINY.num_experts, TINY.d_model, TINY.d_ff)
  assert attn.wq.shape == (TINY.d_model, TINY.num_heads, TINY.resolved_head_dim)
  assert TINY.attention_config.rope.theta == TINY.rope_theta
  with pytest.raises(TypeError, match=r"MoE\(model_cfg.moe_config, rngs=rngs\)"):
    MoE(32, 32, 8, gate_fn="softmax", renormalize=False, dispatch="padded",
        capacity_factor=None, init_std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"Attention\(model_cfg.attention_config, rngs=rngs\)"):
    Attention(32, 4, 2, 8, qk_norm=True, rope_theta=1e4, norm_eps=1e-6, init_std=0.1,
              dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("contract", [1, 2])
def test_dense_value_and_gradients_match_numpy(contract):
  """`layers.dense` (the attention projections' matmul, with its own backward) against the NumPy
  products: y = x @ W over the contracted dimensions, d x = dy @ W^T, d W = x^T @ dy."""
  from sigma_moe_jax.layers import dense
  keys = jax.random.split(jax.random.key(0), 3)
  x_shape, w_shape = ((2, 5, 6), (6, 3, 4)) if contract == 1 else ((2, 5, 3, 4), (3, 4, 6))
  x = np.asarray(jax.random.normal(keys[0], x_shape))
  w = np.asarray(jax.random.normal(keys[1], w_shape))
  k = int(np.prod(w_shape[:contract]))
  rows, w_rows = x.reshape(-1, k), w.reshape(k, -1)
  y = jax.jit(functools.partial(dense, contract=contract))(x, w)
  np.testing.assert_allclose(y, (rows @ w_rows).reshape(y.shape), rtol=1e-5, atol=1e-5)
  dy = np.asarray(jax.random.normal(keys[2], y.shape))
  d_x, d_w = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w, contract) * dy), (0, 1)))(x, w)
  dy_rows = dy.reshape(rows.shape[0], -1)
  np.testing.assert_allclose(d_x, (dy_rows @ w_rows.T).reshape(x_shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_w, (rows.T @ dy_rows).reshape(w_shape), rtol=1e-5, atol=1e-5)
