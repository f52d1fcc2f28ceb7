"""Supervised fine-tuning: the chat template against transformers, the loss mask against plain
loops, packed conversations against one per row, the pipeline's refusals and resume, and context
extension (only the RoPE frequencies change)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.data import chat
from sigma_moe_jax.data.pipeline import make_chat_pipeline
from sigma_moe_jax.data.tokenizer import load_tokenizer
from sigma_moe_jax.layers import positions_from_segments, rope_frequencies
from sigma_moe_jax.training import step as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = chat.ChatTemplate.load(os.path.join(ROOT, "data", "chat_template.jinja"))
TOKENIZER = load_tokenizer(os.path.join(ROOT, "data", "shakespeare_bpe4096.json"))
CFG = ModelConfig(vocab_size=4096, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=8, d_ff=32, top_k=1, init_std=0.1)
CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Who speaks next?\n\nROMEO.\nBut soft!"},
     {"role": "assistant", "content": "JULIET"},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "ROMEO"}],
    [{"role": "user", "content": "Continue this speech.\n\nHAMLET.\nTo be, or not to be:"},
     {"role": "assistant", "content": "that is the question."}],
    [{"role": "user", "content": "Name a play."},
     {"role": "assistant", "content": "The Tempest, in which a magician rules an island."}],
]


def _encode(messages, max_len=256, truncate=False):
  return chat.encode(messages, TEMPLATE, TOKENIZER, max_len=max_len, truncate=truncate)


def test_template_renders_as_transformers_and_the_mask_covers_the_replies():
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(ROOT, "data", "shakespeare_bpe4096.json"),
      eos_token="<|endoftext|>")
  hf.chat_template = TEMPLATE.source
  for messages in CONVERSATIONS:
    text = TEMPLATE.render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert TEMPLATE.prompt(messages[:-1]) == hf.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)
    example = _encode(messages)
    assert TOKENIZER.decode(example.tokens) == text
    # The targets, read back: each assistant reply followed by its end-of-text, nothing else.
    targets = TOKENIZER.decode(example.tokens[example.loss_mask == 1])
    replies = [m["content"] + "<|endoftext|>" for m in messages if m["role"] == "assistant"]
    assert targets == "".join(replies)
    assert chat.prompt_ids(messages[:-1], TEMPLATE, TOKENIZER) == list(
        example.tokens[:len(chat.prompt_ids(messages[:-1], TEMPLATE, TOKENIZER))])


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "narrator", "content": "x"}]}, "unknown role 'narrator'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant token"),
    ({"messages": []}, "non-empty list"),
    ({"text": "plain"}, "expected"),
    ({"messages": [{"role": "user", "content": 3}]}, "string 'content'"),
])
def test_bad_conversations_are_refused_naming_the_line(tmp_path, record, message):
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps({"prompt": "fine", "completion": "yes"}) + "\n" + json.dumps(record)
                  + "\n")
  with pytest.raises(ValueError, match=message) as error:
    chat.load_examples([str(path)], TEMPLATE, TOKENIZER, max_len=64)
  assert f"{path}:2" in str(error.value)


def test_a_long_conversation_is_refused_or_truncated():
  messages = CONVERSATIONS[2]
  full = _encode(messages)
  with pytest.raises(ValueError, match="do not fit the context of 20.*data.truncate"):
    _encode(messages, max_len=20)
  cut = _encode(messages, max_len=len(full.tokens) - 3, truncate=True)
  np.testing.assert_array_equal(cut.tokens, full.tokens[:len(full.tokens) - 3])
  np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:len(full.tokens) - 3])
  prompt_only = int(np.argmax(full.loss_mask))  # cut before the reply starts
  with pytest.raises(ValueError, match="no assistant token to train on within the context"):
    _encode(messages, max_len=prompt_only, truncate=True)


def test_prompt_completion_records_are_one_user_and_one_assistant_message():
  assert chat.messages_of({"prompt": "Q", "completion": "A"}, "x") == [
      {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def _examples():
  return [_encode(m) for m in CONVERSATIONS]


def test_pipeline_packs_whole_conversations_and_resumes_exactly():
  examples = _examples()
  longest = max(len(e.tokens) for e in examples)
  batches = list(make_chat_pipeline(examples, seq_len=longest + 40, batch_size=2, seed=0,
                                    shuffle=False, repeat=False))
  seen = []
  for batch in batches:
    for row in range(2):
      for segment in set(batch["segment_ids"][row].tolist()) - {0}:
        at = batch["segment_ids"][row] == segment
        seen.append(batch["tokens"][row][at].tolist())
        match = [e for e in examples if e.tokens.tolist() == seen[-1]]
        assert match, "a packed conversation is whole"
        np.testing.assert_array_equal(batch["loss_mask"][row][at], match[0].loss_mask)
        np.testing.assert_array_equal(batch["positions"][row][at], np.arange(at.sum()))
  assert sorted(map(tuple, seen)) == sorted(tuple(e.tokens.tolist()) for e in examples)
  with pytest.raises(ValueError, match="does not fit a row of"):
    make_chat_pipeline(examples, seq_len=longest - 1, batch_size=2, seed=0)

  stream = make_chat_pipeline(examples, seq_len=longest + 10, batch_size=2, seed=3)
  for _ in range(4):
    next(stream)
  state = json.loads(json.dumps(stream.get_state()))
  want = [next(stream) for _ in range(3)]
  resumed = make_chat_pipeline(examples, seq_len=longest + 10, batch_size=2, seed=3)
  resumed.set_state(state)
  for expected in want:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_masked_loss_equals_a_loop_over_the_unmasked_positions():
  rng = np.random.default_rng(0)
  segments = np.asarray([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16], np.int32)
  loss_mask = rng.integers(0, 2, segments.shape).astype(np.int32)
  tokens = rng.integers(0, 50, segments.shape).astype(np.int32)
  logits = rng.normal(size=(*segments.shape, 50)).astype(np.float32)
  total, count = train_lib.lm_loss_terms(jnp.asarray(logits), tokens, segments, loss_mask)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  want, n = 0.0, 0
  for b in range(2):
    for i in range(15):
      if segments[b, i + 1] and segments[b, i + 1] == segments[b, i] and loss_mask[b, i + 1]:
        want -= log_probs[b, i, tokens[b, i + 1]]
        n += 1
  assert int(count) == n > 0
  np.testing.assert_allclose(float(total), want, rtol=1e-5)


def _per_segment_losses(params, graphdef, batch):
  """{tuple(tokens): summed masked cross-entropy} of every conversation in the batch."""
  model = nnx.merge(graphdef, params)
  top_k = jnp.ones((CFG.num_layers,), jnp.int32)
  logits, _ = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]),
                    jnp.asarray(batch["positions"]), top_k=top_k)
  log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  out = {}
  for row in range(batch["tokens"].shape[0]):
    segments, tokens = batch["segment_ids"][row], batch["tokens"][row]
    for segment in set(segments.tolist()) - {0}:
      where = np.flatnonzero(segments == segment)
      loss = -sum(log_probs[row, i - 1, tokens[i]] for i in where[1:]
                  if batch["loss_mask"][row, i])
      out[tuple(tokens[where].tolist())] = loss
  return out


def test_packed_conversations_give_the_loss_of_one_conversation_per_row():
  graphdef, params = train_lib.init_model(CFG.replace(capacity_factor=None), 0)
  examples = _examples()
  width = sum(len(e.tokens) for e in examples)
  packed = next(make_chat_pipeline(examples, seq_len=width, batch_size=1, seed=0,
                                   shuffle=False, repeat=False))
  assert len(set(packed["segment_ids"][0].tolist()) - {0}) == len(examples)
  alone = {"tokens": np.zeros((3, width), np.int32), "loss_mask": np.zeros((3, width), np.int32),
           "segment_ids": np.zeros((3, width), np.int32)}
  for row, e in enumerate(examples):
    n = len(e.tokens)
    alone["tokens"][row, :n], alone["loss_mask"][row, :n] = e.tokens, e.loss_mask
    alone["segment_ids"][row, :n] = 1
  alone["positions"] = np.asarray(positions_from_segments(jnp.asarray(alone["segment_ids"])))
  got = _per_segment_losses(params, graphdef, packed)
  want = _per_segment_losses(params, graphdef, alone)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5)


def test_train_step_trains_on_the_mask_and_balances_every_token():
  """lm_loss is the mean over the masked targets; the LBL counts every non-padding token, masked
  or not (docs/design.md "Supervised fine-tuning": the experts compute the prompt too)."""
  balance = train_lib.BalanceSettings(loss="lbl", coef=1e-2)
  graphdef, params = train_lib.init_model(CFG, 0)
  lr = train_lib.learning_rate_schedule(lr=1e-2, steps=10, warmup_steps=1, kind="cosine")
  optimizer = train_lib.make_optimizer(lr)
  step = jax.jit(train_lib.make_train_step(graphdef, optimizer, lr, CFG, balance))
  batch = next(make_chat_pipeline(_examples(), seq_len=96, batch_size=2, seed=0,
                                  shuffle=False, repeat=False))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  unmasked = {k: v for k, v in batch.items() if k != "loss_mask"}
  state = train_lib.init_state(params, optimizer, CFG)
  _, masked_metrics = step(state, batch)
  _, plain_metrics = step(train_lib.init_state(params, optimizer, CFG), unmasked)
  ce, n, _ = jax.jit(train_lib.make_eval_step(graphdef))(params, batch, jnp.ones((2,), jnp.int32))
  np.testing.assert_allclose(masked_metrics["lm_loss"], float(ce) / int(n), rtol=1e-5)
  assert int(masked_metrics["targets"]) == int(n) < int(plain_metrics["targets"])
  np.testing.assert_allclose(masked_metrics["lbl_per_layer"], plain_metrics["lbl_per_layer"],
                             rtol=1e-6)
  np.testing.assert_array_equal(masked_metrics["drop_fraction"], plain_metrics["drop_fraction"])


def test_context_extension_changes_only_the_rope_frequencies():
  base = CFG.replace(capacity_factor=None)
  extended = base.replace(rope_theta=40_000.0, rope_scaling="yarn", rope_scaling_factor=2.0,
                          rope_original_len=16)
  graph_a, params_a = train_lib.init_model(base, 0)
  graph_b, params_b = train_lib.init_model(extended, 0)
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  # The extended model, run with the base model's parameters, equals a base model whose
  # attention rotates by the extended frequencies.
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 4096, (1, 24)), jnp.int32)
  segments = jnp.ones_like(tokens)
  top_k = jnp.ones((2,), jnp.int32)
  run = lambda graph: nnx.merge(graph, params_a)(tokens, segments, top_k=top_k)[0]
  inv_freq, attention = rope_frequencies(base.resolved_head_dim, 40_000.0, "yarn", 2.0, 16)

  def rotate_like_extended(x, positions, theta, *scaling):
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    sin, cos = (attention * f(angles)[:, :, None, :] for f in (jnp.sin, jnp.cos))
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("sigma_moe_jax.layers.apply_rope", rotate_like_extended)
    want = run(graph_a)
  np.testing.assert_allclose(run(graph_b), want, atol=1e-5)
  assert not np.allclose(run(graph_a), run(graph_b), atol=1e-3)


def test_yarn_frequencies_match_transformers():
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = transformers.Qwen3MoeConfig(
      hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=512,
      rope_theta=10_000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 128})
  theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
  ours, our_factor = rope_frequencies(32, 10_000.0, "yarn", 4.0, 128)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
  assert math.isclose(our_factor, their_factor, rel_tol=1e-9)
  plain, one = rope_frequencies(32, 10_000.0)
  assert one == 1.0 and not np.allclose(np.asarray(plain), np.asarray(ours))
