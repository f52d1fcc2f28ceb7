"""Text documents -> packed, batched token sequences with a checkpointable grain iterator.

Documents are sharded by JAX process before anything else, so every process reads distinct
documents; each process then builds its own per-process batch. Documents are tokenized,
terminated with the end-of-text id and packed back to back by grain's concat-then-split
packer, so no token is dropped and a long document continues in the next row.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np

from sigma_moe_jax.data.tokenizer import Tokenizer
from sigma_moe_jax.infra import storage

_TEXT_SUFFIXES = (".txt", ".txt.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Reading ahead a few documents is plenty: one document usually fills many batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

Batch = Dict[str, np.ndarray]


def data_files(pattern: str) -> List[str]:
  """The files a path, a comma-separated list of paths, or globs (local or `gs://`) name, sorted
  and without duplicates. Only names are listed; nothing is read."""
  files = set()
  for part in (p.strip() for p in pattern.split(",")):
    if not part:
      continue
    matches = storage.glob(part)
    if not matches:
      raise ValueError(f"no data file matches {part!r}")
    files.update(matches)
  if not files:
    raise ValueError(f"no data file matches {pattern!r}")
  for path in files:
    if not path.endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES):
      raise ValueError(f"unsupported data file {path!r}: expected one of "
                       f"{_TEXT_SUFFIXES + _JSONL_SUFFIXES}")
  return sorted(files)


def load_documents(pattern: str) -> List[str]:
  """Reads documents from a path, a comma-separated list of paths, or globs.

  `.txt`/`.txt.gz` files are one document each; `.jsonl`/`.jsonl.gz` files give one document
  per line from its "text" field. Files are read in sorted order and blank documents dropped.
  """
  docs = []
  for path in data_files(pattern):
    docs.extend(read_documents(path))
  if not docs:
    raise ValueError(f"no non-empty documents in {pattern!r}")
  return docs


def read_documents(path: str) -> List[str]:
  """The non-blank documents of one data file."""
  try:
    with storage.open_file(path, "rt") as f:
      content = f.read()
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise ValueError(f"cannot read data file {path!r}: {e}") from e
  if not content.strip():
    raise ValueError(f"data file {path!r} is empty")
  if path.endswith(_TEXT_SUFFIXES):
    return [content]
  docs = []
  for lineno, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
      raise ValueError(f"{path}:{lineno}: line has no string 'text' field")
    docs.append(text)
  return [d for d in docs if d.strip()]


# Piece size when a corpus has too few documents to hold out whole ones and data.chunk_chars is 0.
VALIDATION_PIECE_CHARS = 2000


def validation_piece_chars(chunk_chars: int) -> int:
  """The piece size of a split that holds out pieces: data.chunk_chars, or the default."""
  return chunk_chars or VALIDATION_PIECE_CHARS


def holds_out_pieces(num_docs: int, val_fraction: float) -> bool:
  """Whether `split_documents` with pieces allowed holds out pieces of documents: validation is
  on, and the fraction of the documents is less than one whole document."""
  return val_fraction > 0 and val_fraction * num_docs < 1


def split_documents(docs: Sequence[str], val_fraction: float, seed: int,
                    piece_chars: int = 0) -> Tuple[List[str], List[str]]:
  """Holds out whole documents for validation, so no validation text is seen in training.

  The held-out set is `round(val_fraction * len(docs))` documents chosen by `seed`, at least
  one when `val_fraction > 0` and there are >= 2 documents; training keeps at least one.
  Both lists keep the input order.

  With `piece_chars` > 0 and too few documents to hold out whole ones (`holds_out_pieces`: one
  big text file, a handful of books), the documents are first cut at line breaks into pieces of
  at most `piece_chars` characters (`chunk_documents`), and pieces are held out by the same rule,
  so that `val_fraction` is still about the share of the text held out.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
  if piece_chars > 0 and holds_out_pieces(len(docs), val_fraction):
    docs = chunk_documents(docs, piece_chars)
  n = len(docs)
  if n == 0:
    raise ValueError("cannot split an empty document list")
  num_val = int(round(val_fraction * n))
  if val_fraction > 0 and n >= 2:
    num_val = max(num_val, 1)
  num_val = min(num_val, n - 1)
  val_idx = set(np.random.default_rng(seed).permutation(n)[:num_val].tolist())
  train = [d for i, d in enumerate(docs) if i not in val_idx]
  val = [d for i, d in enumerate(docs) if i in val_idx]
  return train, val


def chunk_documents(docs: Sequence[str], max_chars: int) -> List[str]:
  """Cuts documents longer than `max_chars` at line breaks into pieces of at most that size (a
  single longer line stays whole).

  Whole plays packed one after another fill many consecutive batches from one play; pieces,
  shuffled, give each batch text from all over the corpus. Apply it after `split_documents` so
  that validation still holds out whole documents.
  """
  if max_chars < 1:
    raise ValueError(f"max_chars={max_chars} must be a positive integer")
  pieces = []
  for doc in docs:
    current = ""
    for line in doc.splitlines(keepends=True):
      if current and len(current) + len(line) > max_chars:
        pieces.append(current)
        current = ""
      current += line
    if current.strip():
      pieces.append(current)
  return pieces


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Fails early if the tokenizer can emit ids the model's embedding does not have."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model "
                     f"vocab_size {model_vocab_size}")


def make_pipeline(docs: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True, repeat: bool = True,
                  max_vocab: Optional[int] = None) -> grain.DatasetIterator:
  """Returns an iterator of per-process batches of packed token sequences.

  Each element is a dict of int32 numpy arrays of shape [batch_size, seq_len]:
    tokens: token ids; 0 at padding.
    segment_ids: 1, 2, ... numbering the document pieces within a row; 0 at padding.
    positions: index of the token within its document piece (restarts at 0 on each piece,
      including a document continued from the previous row); 0 at padding.
  With `repeat` the stream is infinite and every row is full (no padding); `shuffle`
  reorders documents with a new order each epoch. Without `repeat` the stream ends after
  one pass: only the last row may be partly padding, and the last batch is padded with
  all-padding rows (segment_ids 0), so every token is seen once. The iterator's
  `get_state()` is JSON-serialisable and `set_state()` of a fresh iterator built with the
  same arguments resumes with exactly the same batches.
  """
  _check_geometry(seq_len, batch_size, process_index, process_count, tokenizer, max_vocab)
  shard = list(docs)[process_index::process_count]
  if not shard:
    raise ValueError(f"process {process_index} of {process_count} gets no documents "
                     f"({len(docs)} in total); use fewer processes or more documents")
  ds = grain.MapDataset.source(shard)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()  # reseeds the shuffle each epoch
  return _pack(ds.to_iter_dataset(_READ_OPTIONS), tokenizer, seq_len, batch_size)


def make_chat_pipeline(examples: Sequence[Any], *, seq_len: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                       repeat: bool = True) -> grain.DatasetIterator:
  """Batches of whole encoded conversations (`chat.Example`: tokens and loss mask, each at most
  `seq_len` long) packed several to a row by grain's first-fit packer: a conversation is never
  split across rows, so the rest of a row is padding (segment_ids 0).

  Each element holds int32 [batch_size, seq_len] `tokens`, `segment_ids`, `positions` (as in
  `make_pipeline`) and `loss_mask`. Every conversation keeps its own segment id, so attention
  and positions stay inside it. `shuffle`, `repeat` and the JSON-serialisable state behave as in
  `make_pipeline`; without `repeat` the last batch is filled with empty rows.
  """
  _check_geometry(seq_len, batch_size, process_index, process_count, None, None)
  shard = list(examples)[process_index::process_count]
  if not shard:
    raise ValueError(f"process {process_index} of {process_count} gets no conversations "
                     f"({len(examples)} in total); use fewer processes or more conversations")
  longest = max(len(e.tokens) for e in shard)
  if longest > seq_len:
    raise ValueError(f"a conversation of {longest} tokens does not fit a row of {seq_len}")
  ds = grain.MapDataset.source(shard)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(lambda e: {"tokens": np.asarray(e.tokens, np.int32),
                         "loss_mask": np.asarray(e.loss_mask, np.int32)})
  # One packing round per batch: a bin per row.
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(_READ_OPTIONS), length_struct={"tokens": seq_len, "loss_mask": seq_len},
      num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle)
  batched = packed.batch(batch_size, drop_remainder=False)
  return _JsonStateDataset(batched.map(lambda b: _to_chat_batch(b, batch_size))).__iter__()


def _to_chat_batch(packed: Dict[str, np.ndarray], batch_size: int) -> Batch:
  batch = _to_batch(packed, batch_size)
  short = batch_size - packed["loss_mask"].shape[0]
  batch["loss_mask"] = np.pad(packed["loss_mask"], ((0, short), (0, 0))).astype(np.int32)
  return batch


def make_block_pipeline(groups: Sequence[Sequence[str]], tokenizer: Tokenizer, *, seq_len: int,
                        batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1,
                        max_vocab: Optional[int] = None) -> grain.DatasetIterator:
  """Batches whose rows come in equal consecutive blocks, block i packed from `groups[i]` alone
  (its own `make_pipeline` stream, shuffled with seed + i).

  A batch axis split into shards that are a multiple of the number of groups then gives every
  shard one group: with two corpora and 4 data-parallel shards, shards 0-1 read the first and
  2-3 the second (the setting where micro-batch and global-batch balancing differ). The state is
  every stream's state, so a restored iterator resumes all of them exactly.
  """
  if not groups:
    raise ValueError("no document groups to fill the batch's blocks")
  if batch_size % len(groups):
    raise ValueError(f"a batch of {batch_size} rows does not split into {len(groups)} equal "
                     f"blocks, one per document group")
  streams = [make_pipeline(docs, tokenizer, seq_len=seq_len, batch_size=batch_size // len(groups),
                           seed=seed + i, process_index=process_index,
                           process_count=process_count, max_vocab=max_vocab)
             for i, docs in enumerate(groups)]
  return _RowBlocks(streams)


class _RowBlocks(grain.DatasetIterator):
  """Concatenates one batch of each stream along the rows."""

  def __init__(self, streams: Sequence[grain.DatasetIterator]):
    super().__init__(list(streams))
    self._streams = list(streams)

  def __next__(self) -> Batch:
    parts = [next(stream) for stream in self._streams]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

  def get_state(self) -> Dict[str, Any]:
    return {"blocks": [stream.get_state() for stream in self._streams]}

  def set_state(self, state: Dict[str, Any]) -> None:
    blocks = state.get("blocks", [])
    if len(blocks) != len(self._streams):
      raise ValueError(f"the data state holds {len(blocks)} row blocks, this pipeline has "
                       f"{len(self._streams)}")
    for stream, block in zip(self._streams, blocks):
      stream.set_state(block)


def make_file_pipeline(files: Sequence[str], tokenizer: Tokenizer, *, seq_len: int,
                       batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, chunk_chars: int = 0,
                       max_vocab: Optional[int] = None) -> grain.DatasetIterator:
  """`make_pipeline` for corpora too large to hold on every host: each process takes every
  `process_count`-th file and reads one file at a time, when the stream reaches it.

  Files are shuffled by `seed` (anew each epoch) and their documents read in order, cut by
  `chunk_chars` when it is set. The stream repeats; its state is the position in the file order
  and within the current file, so a restored iterator reads that one file again and goes on.
  """
  _check_geometry(seq_len, batch_size, process_index, process_count, tokenizer, max_vocab)
  shard = list(files)[process_index::process_count]
  if not shard:
    raise ValueError(f"process {process_index} of {process_count} gets no data file "
                     f"({len(files)} in total); with data.shard_files every process needs "
                     f"at least one file")
  read = lambda path: (chunk_documents(read_documents(path), chunk_chars) if chunk_chars
                       else read_documents(path))
  files_ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat()
  docs = grain.experimental.FlatMapIterDataset(files_ds.to_iter_dataset(), _ReadFile(read))
  return _pack(docs, tokenizer, seq_len, batch_size)


def _check_geometry(seq_len, batch_size, process_index, process_count, tokenizer, max_vocab):
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("process_count", process_count)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value} must be a positive integer")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if max_vocab is not None and tokenizer is not None:
    check_vocab(tokenizer, max_vocab)


class _ReadFile(grain.experimental.FlatMapTransform):
  def __init__(self, read):
    self.read = read

  def flat_map(self, path):
    return self.read(path)


def _pack(docs: grain.IterDataset, tokenizer: Tokenizer, seq_len: int,
          batch_size: int) -> grain.DatasetIterator:
  """Documents -> tokens ended by end-of-text -> packed rows -> batches."""
  eos_id = tokenizer.eos_id
  tokens = docs.map(lambda text: {"tokens": np.asarray(tokenizer.encode(text) + [eos_id],
                                                       np.int32)})
  packed = grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={"tokens": seq_len})
  batched = packed.batch(batch_size, drop_remainder=False)
  return _JsonStateDataset(batched.map(lambda b: _to_batch(b, batch_size))).__iter__()


def _to_batch(packed: Dict[str, np.ndarray], batch_size: int) -> Batch:
  """Renames grain's packer outputs and pads a short final batch with empty rows."""
  out = {"tokens": packed["tokens"], "segment_ids": packed["tokens_segment_ids"],
         "positions": packed["tokens_positions"]}
  short = batch_size - out["tokens"].shape[0]
  return {k: np.pad(v, ((0, short), (0, 0))).astype(np.int32) for k, v in out.items()}


class _JsonStateDataset(grain.IterDataset):
  """Makes the pipeline's state survive a JSON round trip."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):
  """Passes elements through; returns the state in JSON types and accepts it back.

  grain's concat-then-split packer keeps `remainder_slices` as tuples and tests them with
  `!= (-1, -1)`; after JSON turns them into lists every slice reads as a remainder and a
  restored iterator silently skips a document. The tuples are rebuilt before restoring.
  """

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> Dict[str, Any]:
    return json.loads(json.dumps(self._parent.get_state()))

  def set_state(self, state: Dict[str, Any]) -> None:
    self._parent.set_state(_slices_as_tuples(json.loads(json.dumps(state))))


def _slices_as_tuples(state: Any) -> Any:
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _slices_as_tuples(v)) for k, v in state.items()}
  if isinstance(state, list):
    return [_slices_as_tuples(v) for v in state]
  return state
