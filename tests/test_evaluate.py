"""Scoring by log-likelihood against direct sums over the forward pass, and the generate and
evaluate launchers on a trained tiny run, bad input included."""

import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.inference import generate, scoring
from sigma_moe_jax.training import step as train_lib
from tests.test_launcher import ROOT, launch

CFG = generate.inference_config(ModelConfig(
    vocab_size=50, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4,
    d_ff=32, init_std=0.3))


@functools.lru_cache(maxsize=None)
def model():
  graphdef, params = train_lib.init_model(CFG, 1)
  return nnx.merge(graphdef, params)


def logprob_fn(tokens, segment_ids):
  return jax.jit(generate.token_logprobs)(model(), jnp.asarray(tokens), jnp.asarray(segment_ids))


def direct_logprob_sum(sequence, start):
  """Sum of log p(sequence[t]) for t >= start, from one unpadded forward pass."""
  logits, _ = model()(jnp.asarray([sequence]))
  logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
  return sum(logprobs[t - 1, sequence[t]] for t in range(start, len(sequence)))


def test_choice_scores_are_direct_sums_of_forward_log_probabilities():
  rng = np.random.default_rng(0)
  ids = lambda n: rng.integers(0, CFG.vocab_size, n).tolist()
  examples = [(ids(5), [ids(3), ids(1), ids(4)]), (ids(9), [ids(2), ids(2)]),
              (ids(30), [ids(6), ids(3)])]  # the last context is cut to fit the width of 16
  scores = scoring.choice_scores(examples, logprob_fn, width=16, batch_size=4)
  for (context, choices), per_choice in zip(examples, scores):
    for choice, (score, length) in zip(choices, per_choice):
      kept = context[max(0, len(context) + len(choice) - 16):]
      assert length == len(choice)
      np.testing.assert_allclose(score, direct_logprob_sum(kept + choice, len(kept)), rtol=1e-4)


def test_accuracy_and_its_standard_error():
  scores = [[(-1.0, 1), (-3.0, 4)], [(-5.0, 5), (-2.0, 1)], [(-2.0, 1), (-3.0, 6)]]
  result = scoring.accuracy(scores, [0, 0, 1])
  assert result["accuracy"] == pytest.approx(1 / 3)  # by sum: 0, 1, 0
  assert result["accuracy_length_normalised"] == pytest.approx(2 / 3)  # by mean: 0, 0, 1
  assert result["accuracy_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
  assert result["chance"] == 0.5


def test_corpus_perplexity_is_the_mean_over_windows():
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (20, 7, 1)]
  token_bytes = np.arange(CFG.vocab_size) % 3 + 1
  per_document = []
  result = scoring.corpus_perplexity(docs, token_bytes, logprob_fn, width=8, batch_size=4,
                                     per_document=per_document)
  nll, tokens, nbytes = 0.0, 0, 0
  for doc, record in zip(docs, per_document):
    doc_nll = doc_tokens = 0
    for i in range(0, len(doc), 8):
      window = doc[i:i + 8]
      if len(window) > 1:
        doc_nll -= direct_logprob_sum(window, 1)
        doc_tokens += len(window) - 1
        nbytes += int(token_bytes[window[1:]].sum())
    np.testing.assert_allclose(record["nll"], doc_nll, rtol=1e-5, atol=1e-5)
    assert record["tokens"] == doc_tokens
    nll, tokens = nll + doc_nll, tokens + doc_tokens
  assert len(per_document) == len(docs) and per_document[2] == {"nll": 0.0, "tokens": 0,
                                                                 "bytes": 0}
  assert result["tokens"] == tokens and result["bytes"] == nbytes
  assert sum(r["bytes"] for r in per_document) == nbytes
  np.testing.assert_allclose(result["nll_per_token"], nll / tokens, rtol=1e-5)
  np.testing.assert_allclose(result["bits_per_byte"], nll / math.log(2) / nbytes, rtol=1e-5)


def run_module(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "run"
  code, _, err = launch(workdir, "--config.train.steps=3")
  assert code == 0, err[-2000:]
  return workdir


@pytest.mark.integration
def test_generate_launcher(trained, tmp_path):
  code, out, err = run_module("sigma_moe_jax.cli.generate", f"--workdir={trained}",
                              "--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0")
  assert code == 0, err[-2000:]
  assert out.startswith("ROMEO:") and "decode" in out and "tokens/s" in out
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("To be\nO Romeo, Romeo\n")
  out_file = tmp_path / "out.jsonl"
  code, _, err = run_module("sigma_moe_jax.cli.generate", f"--workdir={trained}",
                            f"--prompts_file={prompts}", f"--out={out_file}", "--max_new_tokens=4",
                            "--seed=3")
  assert code == 0, err[-2000:]
  records = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["To be", "O Romeo, Romeo"]
  assert all(1 <= r["tokens"] <= 4 for r in records)


@pytest.mark.integration
def test_evaluate_launcher_multiple_choice_and_corpus(trained, tmp_path):
  task = tmp_path / "task.jsonl"
  task.write_text("".join(json.dumps({"context": c, "choices": ch, "label": label}) + "\n"
                          for c, ch, label in [("To be, or not", [" to be", " a cat"], 0),
                                               ("O Romeo", [" Romeo", " dog", " x"], 1)]))
  out = tmp_path / "result.json"
  code, _, err = run_module("sigma_moe_jax.cli.evaluate", f"--workdir={trained}", f"--task={task}",
                            f"--out={out}", "--batch_size=2")
  assert code == 0, err[-2000:]
  result = json.loads(out.read_text())
  assert result["examples"] == 2 and 0 <= result["accuracy"] <= 1 and result["step"] == 3
  assert result["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
  # One record per example beside the aggregate, from which the accuracy recomputes.
  assert result["examples_file"] == "result.examples.jsonl"
  records = [json.loads(line) for line in (tmp_path / "result.examples.jsonl").open()]
  assert [r["index"] for r in records] == [0, 1] and [r["label"] for r in records] == [0, 1]
  assert records[0]["context_sha256"] == hashlib.sha256(b"To be, or not").hexdigest()
  for r in records:
    assert r["prediction"] == int(np.argmax(r["loglikelihoods"]))
    assert r["prediction_length_normalised"] == int(np.argmax(
        np.asarray(r["loglikelihoods"]) / np.asarray(r["choice_tokens"])))
    assert all(n >= 1 for n in r["choice_tokens"]) and all(s < 0 for s in r["loglikelihoods"])
  assert result["accuracy"] == np.mean([r["prediction"] == r["label"] for r in records])
  assert result["accuracy_length_normalised"] == np.mean(
      [r["prediction_length_normalised"] == r["label"] for r in records])
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("Now is the winter of our discontent\nMade glorious summer by this sun.\n")
  code, _, err = run_module("sigma_moe_jax.cli.evaluate", f"--workdir={trained}",
                            f"--task={corpus}", f"--out={out}")
  assert code == 0, err[-2000:]
  result = json.loads(out.read_text())
  assert result["bits_per_byte"] > 0 and result["perplexity"] > 1
  records = [json.loads(line) for line in (tmp_path / "result.examples.jsonl").open()]
  assert len(records) == 1 and records[0]["tokens"] == result["tokens"]
  assert records[0]["bytes"] == result["bytes"]
  assert records[0]["nll"] / records[0]["tokens"] == pytest.approx(result["nll_per_token"])


@pytest.mark.integration
@pytest.mark.parametrize("case", ["no_checkpoint", "long_prompt", "bad_line", "bad_label",
                                  "tokenizer_changed"])
def test_bad_input_is_one_line(trained, tmp_path, case):
  task = tmp_path / "task.jsonl"
  if case == "no_checkpoint":
    args = ("sigma_moe_jax.cli.generate", f"--workdir={tmp_path / 'empty'}", "--prompt=hi")
    message = "no checkpoints in"
  elif case == "tokenizer_changed":
    tokenizer = tmp_path / "tokenizer.json"
    shutil.copy(os.path.join(ROOT, "data", "shakespeare_bpe4096.json"), tokenizer)
    code, _, err = launch(tmp_path / "run", "--config.train.steps=3",
                          f"--config.data.tokenizer={tokenizer}")
    assert code == 0, err[-2000:]
    with open(tokenizer, "a") as f:
      f.write("\n")
    args = ("sigma_moe_jax.cli.generate", f"--workdir={tmp_path / 'run'}", "--prompt=hi")
    message = "has changed since the run was trained"
  elif case == "long_prompt":
    args = ("sigma_moe_jax.cli.generate", f"--workdir={trained}", "--prompt=" + "word " * 40)
    message = "exceeds the model's context of 32"
  else:
    record = ({"context": "a", "choices": ["b", "c"], "label": 5} if case == "bad_label"
              else "{not json")
    task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n"
                    + (json.dumps(record) if case == "bad_label" else record) + "\n")
    args = ("sigma_moe_jax.cli.evaluate", f"--workdir={trained}", f"--task={task}")
    message = "line 2:"
  code, _, err = run_module(*args)
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, err[-2000:]
