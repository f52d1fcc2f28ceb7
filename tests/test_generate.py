"""Generation against the full forward pass: cached logits at every position, greedy decoding as
repeated argmax, sampling rules, one compilation per batch and length budget."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.inference import generate
from sigma_moe_jax.training import step as train_lib

# Per-layer top-k above 1 in the first layer (built for 2), softmax gate, float32.
CFG = generate.inference_config(ModelConfig(
    vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=6, d_ff=32,
    top_k=1, max_top_k=(2, 1, 1), init_std=0.3, capacity_factor=1.0))
TOP_K = jnp.asarray([2, 1, 1], jnp.int32)


@functools.lru_cache(maxsize=None)
def model_and_params():
  graphdef, params = train_lib.init_model(CFG, 0)
  return graphdef, params


@functools.lru_cache(maxsize=None)
def _jitted_forward():
  graphdef, _ = model_and_params()
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens, top_k=TOP_K)[0])


def full_logits(tokens):
  return np.asarray(_jitted_forward()(model_and_params()[1], jnp.asarray(tokens)))


def test_inference_config_is_dropless():
  assert CFG.capacity_factor is None and CFG.remat == "none"


def test_cached_decoding_matches_the_full_forward_at_every_position():
  graphdef, params = model_and_params()
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  full = rng.integers(0, CFG.vocab_size, size=(2, 20)).astype(np.int32)
  lengths = np.asarray([5, 9], np.int32)  # prompts of different lengths in one batch
  tokens = np.where(np.arange(16)[None] < lengths[:, None], full[:, :16], 0)
  want = full_logits(full)
  logits, cache = jax.jit(functools.partial(generate.prefill, max_len=24))(
      model, jnp.asarray(tokens), jnp.asarray(lengths), TOP_K)
  for row in range(2):
    np.testing.assert_allclose(logits[row], want[row, lengths[row] - 1], rtol=1e-4, atol=1e-4)
  step = jax.jit(generate.decode_step)
  for s in range(8):
    positions = lengths + s
    logits, cache = step(model, jnp.asarray(full[np.arange(2), positions]),
                         jnp.asarray(positions), cache, TOP_K)
    for row in range(2):
      np.testing.assert_allclose(logits[row], want[row, positions[row]], rtol=1e-4, atol=1e-4,
                                 err_msg=f"row {row}, position {positions[row]}")


def test_greedy_generation_is_repeated_argmax_of_the_full_forward():
  graphdef, params = model_and_params()
  prompts = [[3, 14, 15, 9, 2], [6, 5, 35]]
  prefill, decode = generate.make_generate(graphdef, 6, generate.Sampling(temperature=0), None)
  tokens, lengths = generate.pad_prompts(prompts)
  logits, cache = prefill(params, tokens, lengths, TOP_K)
  out, generated = decode(params, logits, cache, lengths, TOP_K, jax.random.key(0))
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(6):  # causal: tokens after the last position do not change its logits
      padded = np.zeros((1, 16), np.int32)
      padded[0, :len(seq)] = seq
      seq.append(int(np.argmax(full_logits(padded)[0, len(seq) - 1])))
    assert out[row].tolist() == seq[len(prompt):]
    assert int(generated[row]) == 6


def test_decoding_compiles_once_and_the_same_key_gives_the_same_tokens():
  graphdef, params = model_and_params()
  sampling = generate.Sampling(temperature=1.0, top_k=10, top_p=0.9)
  prefill, decode = generate.make_generate(graphdef, 5, sampling, eos_id=7)
  results = []
  for prompts, seed in [([[1, 2, 3], [4, 5]], 0), ([[9, 9, 9, 9], [8]], 1), ([[1, 2, 3], [4, 5]], 0)]:
    tokens, lengths = generate.pad_prompts(prompts)
    logits, cache = prefill(params, tokens, lengths, TOP_K)
    results.append(decode(params, logits, cache, lengths, TOP_K, jax.random.key(seed)))
  assert decode._cache_size() == 1 and prefill._cache_size() == 1
  np.testing.assert_array_equal(results[0][0], results[2][0])
  # A row stops at end-of-text: nothing is generated after it.
  for out, generated in results:
    for row in range(2):
      n = int(generated[row])
      assert n == 5 or out[row, n - 1] == 7
      assert (np.asarray(out[row, n:]) == 0).all()


def test_sampling_rules():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda sampling: np.asarray([generate.sample(logits, k, sampling)[0] for k in keys[:200]])
  assert set(draw(generate.Sampling(temperature=1.0, top_k=1))) == {0}
  assert set(draw(generate.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(generate.Sampling(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 >= 0.7
  assert set(draw(generate.Sampling(temperature=1.0, top_p=0.4))) == {0}
  assert generate.sample(logits, keys[0], generate.Sampling(temperature=0))[0] == 0
  with pytest.raises(ValueError, match="top_p"):
    generate.Sampling(top_p=0)
