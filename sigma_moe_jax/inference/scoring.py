"""Measuring a trained model by log-likelihood: multiple-choice tasks and perplexity.

Multiple choice (the way the paper's benchmarks such as MMLU, ARC and HellaSwag are scored): each
choice is appended to its context and scored by the sum of its tokens' log-probabilities; the
prediction is the best choice by that sum, and by the sum divided by the choice's token count
(length-normalised). Perplexity: the mean negative log-likelihood of a corpus's tokens, and bits
per byte, which do not depend on the tokenizer.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# logprob_fn(tokens int32 [B, W], segment_ids int32 [B, W]) -> log p(tokens[:, t + 1] | ...)
# float32 [B, W - 1]: the full forward pass, jitted once for a fixed [B, W].
LogprobFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _batched(sequences: Sequence[List[int]], width: int, batch_size: int, logprob_fn: LogprobFn):
  """Per-sequence target log-probabilities (position t predicts token t + 1), run in batches of
  a fixed shape (padded rows and columns are discarded)."""
  out = []
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for row, seq in enumerate(chunk):
      tokens[row, :len(seq)] = seq
      segments[row, :len(seq)] = 1
    logprobs = np.asarray(logprob_fn(tokens, segments))
    out.extend(logprobs[row, :len(seq) - 1] for row, seq in enumerate(chunk))
  return out


def choice_scores(examples: Sequence[Tuple[List[int], List[List[int]]]], logprob_fn: LogprobFn,
                  *, width: int, batch_size: int) -> List[List[Tuple[float, int]]]:
  """examples: (context ids, [choice ids, ...]). Returns per example, per choice, (sum of the
  choice tokens' log-probabilities, number of choice tokens). A context too long for `width` is
  cut from the left (the choice is always kept whole)."""
  sequences, spans = [], []
  for context, choices in examples:
    for choice in choices:
      if not choice:
        raise ValueError("a choice encodes to no tokens")
      if len(choice) >= width:
        raise ValueError(f"a choice of {len(choice)} tokens does not fit a context of {width}")
      kept = context[max(0, len(context) + len(choice) - width):]
      if not kept:
        raise ValueError("a context encodes to no tokens")
      sequences.append(kept + choice)
      spans.append((len(kept), len(choice)))
  logprobs = _batched(sequences, width, batch_size, logprob_fn)
  scores, i = [], 0
  for _, choices in examples:
    per_choice = []
    for _ in choices:
      start, length = spans[i]
      # Token at position p is predicted at p - 1: the choice's tokens at start..start+length-1.
      per_choice.append((float(np.sum(logprobs[i][start - 1:start - 1 + length])), length))
      i += 1
    scores.append(per_choice)
  return scores


def accuracy(scores: Sequence[Sequence[Tuple[float, int]]], labels: Sequence[int]) -> Dict:
  """Accuracy by summed and by length-normalised log-likelihood, each with its standard error
  sqrt(acc (1 - acc) / n), and the chance level."""
  n = len(labels)
  by_sum = [int(np.argmax([s for s, _ in choices])) for choices in scores]
  by_mean = [int(np.argmax([s / length for s, length in choices])) for choices in scores]
  result = {"examples": n,
            "chance": float(np.mean([1 / len(choices) for choices in scores]))}
  for name, predicted in (("accuracy", by_sum), ("accuracy_length_normalised", by_mean)):
    acc = float(np.mean([p == label for p, label in zip(predicted, labels)]))
    result[name] = acc
    result[name + "_stderr"] = math.sqrt(acc * (1 - acc) / n)
  return result


def corpus_perplexity(documents: Sequence[List[int]], token_bytes: np.ndarray,
                      logprob_fn: LogprobFn, *, width: int, batch_size: int,
                      per_document: Optional[list] = None) -> Dict:
  """documents: token ids (end-of-text included), cut into windows of `width` tokens; every
  token but the first of a window is predicted from the window before it. Returns the mean
  negative log-likelihood (nats per token), perplexity, and bits per byte over the predicted
  tokens, whose bytes are `token_bytes[id]` (UTF-8 length of each token).

  `per_document` (a list) receives one record per document: its summed NLL, predicted tokens and
  their bytes; their sums are the totals the averages come from."""
  windows = [(d, doc[i:i + width]) for d, doc in enumerate(documents)
             for i in range(0, len(doc), width)]
  windows = [(d, w) for d, w in windows if len(w) > 1]
  if not windows:
    raise ValueError("the corpus has no text to score")
  logprobs = _batched([w for _, w in windows], width, batch_size, logprob_fn)
  nll_of, tokens_of, bytes_of = (np.zeros(len(documents)) for _ in range(3))
  for (d, w), lp in zip(windows, logprobs):
    nll_of[d] -= float(np.sum(lp))
    tokens_of[d] += len(w) - 1
    bytes_of[d] += int(token_bytes[np.asarray(w[1:])].sum())
  nll, tokens, predicted_bytes = float(nll_of.sum()), int(tokens_of.sum()), int(bytes_of.sum())
  if per_document is not None:
    per_document.extend({"nll": float(n), "tokens": int(t), "bytes": int(b)}
                        for n, t, b in zip(nll_of, tokens_of, bytes_of))
  return {"tokens": tokens, "bytes": predicted_bytes, "nll_per_token": nll / tokens,
          "perplexity": math.exp(nll / tokens),
          "bits_per_byte": nll / math.log(2) / max(predicted_bytes, 1)}
