"""corpus_facts (experiments/studies/corpus.py, behind experiments/corpus_report.py) against the
training pipeline itself: the tokens one pass of the packed batches holds, and their frequencies."""

import collections
import gzip
import json

import numpy as np
import pytest

from experiments.studies.corpus import corpus_facts
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.data.pipeline import (chunk_documents, load_documents, make_pipeline,
                                         split_documents)
from sigma_moe_jax.data.tokenizer import load_tokenizer
from sigma_moe_jax.training.run_config import make_config

TOKENIZER = "data/shakespeare_bpe4096.json"


def test_corpus_facts_count_what_one_pass_of_the_pipeline_reads(tmp_path):
  path = tmp_path / "docs.jsonl.gz"
  docs = [f"Doc {i}: " + "to be or not to be, " * (i + 1) + "\n" * (i % 3) for i in range(20)]
  with gzip.open(path, "wt") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  config = make_config(ModelConfig.cpu_tiny(num_experts=8))
  config.data.update(path=str(path), tokenizer=TOKENIZER, val_fraction=0.1, chunk_chars=60)
  config.train.update(steps=7, batch_size=2, seq_len=16)
  facts = corpus_facts(config, top=3)

  tokenizer = load_tokenizer(TOKENIZER)
  train, val = split_documents(load_documents(str(path)), 0.1, config.data.seed)
  rows = [batch["tokens"][batch["segment_ids"] > 0] for batch in make_pipeline(
      chunk_documents(train, 60), tokenizer, seq_len=16, batch_size=2, seed=0, shuffle=False,
      repeat=False)]
  seen = np.concatenate(rows)
  counts = collections.Counter(seen.tolist())
  assert (facts["training_documents"], facts["validation_documents"]) == (
      len(chunk_documents(train, 60)), len(val))
  assert facts["training_tokens"] == len(seen)
  assert facts["epochs_per_run"] == pytest.approx(7 * 2 * 16 / len(seen))
  shares = np.asarray(list(counts.values())) / len(seen)
  assert facts["unigram_entropy_nats"] == pytest.approx(-np.sum(shares * np.log(shares)))
  top = facts["most_frequent_tokens"]
  assert [t["id"] for t in top] == [i for i, _ in counts.most_common(3)]
  assert top[0]["times_an_experts_share"] == pytest.approx(top[0]["share"] * 8)


def test_corpus_report_refuses_chat_configs():
  config = make_config(ModelConfig.cpu_tiny())
  config.data.format = "chat"
  with pytest.raises(ValueError, match="plain-text configs"):
    corpus_facts(config)
