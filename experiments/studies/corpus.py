"""Facts about a config's training corpus (experiments/corpus_report.py is the launcher): how many
tokens its training split holds, what share of an epoch a run reads, the unigram entropy, and the
most frequent tokens' shares (the floor they set on balance: a router that sends a token by
identity cannot spread one that is 10% of the data).

The training split is built as training builds it (the validation documents held out, documents
cut at data.chunk_chars, one end-of-text token after each); packing uses every token, so a run
reads train.steps * batch_size * seq_len of them.
"""

import collections

import numpy as np

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data.pipeline import (chunk_documents, load_documents, split_documents,
                                         validation_piece_chars)
from sigma_moe_jax.data.tokenizer import load_tokenizer


def corpus_facts(config, top: int = 10) -> dict:
  data, t = config.data, config.train
  if data.get("format", "text") != "text" or data.get("rows_by_path", False):
    raise ValueError("corpus_report reads plain-text configs with one data.path")
  tokenizer = load_tokenizer(cli_lib.project_path(data.tokenizer))
  train, val = split_documents(load_documents(cli_lib.project_path(data.path)),
                               data.val_fraction, data.seed,
                               validation_piece_chars(data.get("chunk_chars", 0)))
  if data.chunk_chars:
    train = chunk_documents(train, data.chunk_chars)
  counts, total = collections.Counter(), 0
  for doc in train:
    ids = tokenizer.encode(doc) + [tokenizer.eos_id]
    counts.update(ids)
    total += len(ids)
  per_run = int(t.steps * t.batch_size * t.seq_len)
  shares = np.asarray(list(counts.values()), np.float64) / total
  experts = int(config.model.num_experts)
  return {
      "data_path": data.path, "training_documents": len(train),
      "validation_documents": len(val), "training_tokens": total,
      "tokens_per_run": per_run, "epochs_per_run": per_run / total,
      "num_experts": experts,
      # The loss of a model that knows only token frequencies: a bar any trained model must beat.
      "unigram_entropy_nats": float(-np.sum(shares * np.log(shares))),
      "most_frequent_tokens": [
          {"token": tokenizer.decode([i]), "id": int(i), "share": n / total,
           "times_an_experts_share": n / total * experts}
          for i, n in counts.most_common(top)],
  }
