"""Tokenizers behind one small interface: Hugging Face `tokenizer.json` or tiktoken ranks.

The data pipeline and the model only need `encode`, `decode`, `vocab_size` (to size the
embedding) and `eos_id` (appended after every document), so both formats are wrapped to
expose exactly that. A literal end-of-text string inside a text is encoded as the special
token by both formats.
"""

from __future__ import annotations

import base64
import binascii
from typing import Iterable, List, Sequence

import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sigma_moe_jax.infra import storage

EOS_TOKEN = "<|endoftext|>"
# End-of-text names tried, in order, when a tokenizer.json does not use EOS_TOKEN.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
# GPT-2 style pre-tokenization: contractions, letters, digits, punctuation, whitespace runs.
_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?!\S)|\s+""")
_MIN_BPE_VOCAB = 257  # every byte plus the end-of-text token


class Tokenizer:
  """Text <-> token ids. `vocab_size` counts special tokens: every id is < vocab_size."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> List[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError


class _HFTokenizer(Tokenizer):
  """Wraps a `tokenizers.Tokenizer`; no template (BOS/EOS) is added by `encode`."""

  def __init__(self, tok, path: str):
    self._tok = tok
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
      raise ValueError(f"tokenizer {path} has an empty vocabulary")
    # Ids need not be contiguous; the embedding must cover the largest one.
    self.vocab_size = max(vocab.values()) + 1
    for name in _EOS_CANDIDATES:
      if name in vocab:
        self.eos_id = vocab[name]
        break
    else:
      raise ValueError(f"tokenizer {path} has no end-of-text token (tried {_EOS_CANDIDATES})")

  def encode(self, text: str) -> List[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class _TiktokenTokenizer(Tokenizer):
  """Wraps a `tiktoken.Encoding` whose end-of-text token follows the ranks."""

  def __init__(self, encoding):
    self._enc = encoding
    self.vocab_size = encoding.n_vocab
    self.eos_id = encoding.eot_token

  def encode(self, text: str) -> List[int]:
    return self._enc.encode(text, allowed_special="all")

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
  """Loads `*.json` (Hugging Face `tokenizers`) or `*.tiktoken` (base64 token, rank per line)."""
  if not storage.isfile(path):
    raise ValueError(f"tokenizer file {path!r} does not exist")
  if path.endswith(".json"):
    return _load_hf(path)
  if path.endswith(".tiktoken"):
    return _load_tiktoken(path)
  raise ValueError(f"unknown tokenizer format for {path!r}: expected a Hugging Face "
                   "tokenizer '.json' or a tiktoken ranks file '.tiktoken'")


def _load_hf(path: str) -> Tokenizer:
  try:
    tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
  except Exception as e:  # the Rust side raises a bare Exception
    raise ValueError(f"cannot parse Hugging Face tokenizer {path!r}: {e}") from e
  return _HFTokenizer(tok, path)


def _load_tiktoken(path: str) -> Tokenizer:
  ranks = {}
  for lineno, line in enumerate(storage.read_bytes(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error) as e:
      raise ValueError(f"cannot parse tiktoken ranks file {path!r}: line {lineno} is not "
                       f"'<base64 token> <rank>' ({e})") from e
  if not ranks:
    raise ValueError(f"tiktoken ranks file {path!r} is empty")
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"tiktoken ranks in {path!r} are not a permutation of 0..{len(ranks) - 1}")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(f"tiktoken ranks file {path!r} lacks {len(missing)} of the 256 single "
                     "bytes, so some texts could not be encoded")
  encoding = tiktoken.Encoding(
      name=storage.basename(path), pat_str=_SPLIT_PATTERN, mergeable_ranks=ranks,
      special_tokens={EOS_TOKEN: len(ranks)})
  return _TiktokenTokenizer(encoding)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
  """Trains a byte-level BPE (GPT-2 style) on `texts`, saves it to `out_path`, returns it.

  The end-of-text token gets id 0. The vocabulary may come out smaller than `vocab_size`
  when the texts run out of merges.
  """
  if not isinstance(vocab_size, int) or vocab_size < _MIN_BPE_VOCAB:
    raise ValueError(f"vocab_size={vocab_size} must be an integer >= {_MIN_BPE_VOCAB} "
                     "(256 bytes plus the end-of-text token)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  if storage.parent(out_path):
    storage.makedirs(storage.parent(out_path))
  storage.write_text(out_path, tok.to_str(pretty=True))
  return _HFTokenizer(tok, out_path)
