"""A run's text: the training documents (or files, or one group per path), the validation sets
held out from them or named in `data.eval_sets`, and the grain pipelines that batch them."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from sigma_moe_jax.data import chat
from sigma_moe_jax.data.chat import ChatTemplate
from sigma_moe_jax.data.pipeline import (chunk_documents, data_files, holds_out_pieces,
                                         load_documents, make_block_pipeline, make_chat_pipeline,
                                         make_file_pipeline, make_pipeline, read_documents,
                                         split_documents, validation_piece_chars)
from sigma_moe_jax.training.settings import DataSettings, TrainSettings


class Inputs(NamedTuple):
  """The documents of a run, split; the pipelines are built from them (`train_batches`)."""
  tokenizer: Any
  train_docs: Optional[list]  # None with data.shard_files
  train_groups: Optional[list]  # with data.rows_by_path: the training documents of each path
  train_files: Optional[list]  # the files read lazily with data.shard_files, else None
  eval_sets: dict  # name -> documents; "" is the split held out from data.path
  held_out: str = ""  # what the validation split holds out, in words (said once at the start)


def parse_eval_sets(spec: str, read=load_documents) -> dict:
  """"name=paths;name=paths" -> {name: documents}: extra validation sets, each evaluated and
  logged under its own name (e.g. one per domain). Paths as in data.path; the files should hold
  text kept out of training."""
  sets = {}
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    name, sep, paths = part.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not paths.strip():
      raise ValueError(f"data.eval_sets: {part!r} is not name=paths (name an identifier)")
    if name in sets:
      raise ValueError(f"data.eval_sets: {name!r} given twice")
    sets[name] = read(paths.strip())
  return sets


def load_inputs(data: DataSettings, t: TrainSettings, tokenizer) -> Inputs:
  """Reads and splits the documents (or lists the files) of the data settings."""
  read = load_documents
  if data.format == "chat":
    template = ChatTemplate.load(data.chat_template)
    read = lambda paths: chat.load_examples(data_files(paths), template, tokenizer,
                                            max_len=t.seq_len, truncate=data.truncate)
    train_docs, val_docs = split_documents(read(data.path), data.val_fraction, data.seed)
    inputs = Inputs(tokenizer, train_docs, None, None, {"": val_docs})
  elif data.shard_files:
    inputs = _file_inputs(data, tokenizer)
  else:
    inputs = _document_inputs(data, t, tokenizer)
  eval_sets = {k: v for k, v in inputs.eval_sets.items() if v}
  eval_sets.update(parse_eval_sets(data.eval_sets, read))
  for name, docs in eval_sets.items():
    if len(docs) < jax.process_count():
      where = f"data.eval_sets {name!r}" if name else "data.val_fraction"
      raise ValueError(f"{len(docs)} validation documents for {jax.process_count()} "
                       f"processes: give {where} more documents (or set it empty/0)")
  return inputs._replace(eval_sets=eval_sets,
                         held_out=inputs.held_out or _held_out(data, inputs, []))


def _file_inputs(data: DataSettings, tokenizer) -> Inputs:
  train_files, val_files = split_documents(data_files(data.path), data.val_fraction, data.seed)
  if len(train_files) < jax.process_count():
    raise ValueError(f"data.shard_files: {len(train_files)} training files for "
                     f"{jax.process_count()} processes; every process needs at least one")
  val_docs = [doc for f in val_files for doc in read_documents(f)]
  return Inputs(tokenizer, None, None, train_files, {"": val_docs})


def _document_inputs(data: DataSettings, t: TrainSettings, tokenizer) -> Inputs:
  """Each path of data.path split on its own (with rows_by_path every one keeps training
  documents); a corpus of too few documents holds out pieces of them instead."""
  paths = [p for p in data.path.split(",") if p.strip()] if data.rows_by_path else [data.path]
  if data.rows_by_path and len(paths) < 2:
    raise ValueError(f"data.rows_by_path needs several comma-separated paths in data.path, "
                     f"got {data.path!r}")
  piece_chars = validation_piece_chars(data.chunk_chars)
  groups, val_docs, pieces = [], [], []
  for path in paths:
    docs = load_documents(path)
    if holds_out_pieces(len(docs), data.val_fraction):
      pieces.append(f"{path} ({len(docs)} document{'s' if len(docs) > 1 else ''})")
    train, val = split_documents(docs, data.val_fraction, data.seed, piece_chars)
    groups.append(chunk_documents(train, data.chunk_chars) if data.chunk_chars else train)
    val_docs += val
  rows = t.batch_size // jax.process_count()
  if data.rows_by_path and rows % len(paths):
    raise ValueError(f"data.rows_by_path: the {rows} rows of each process's batch do not split "
                     f"into {len(paths)} equal blocks, one per path")
  inputs = Inputs(tokenizer, [d for group in groups for d in group],
                  groups if data.rows_by_path else None, None, {"": val_docs})
  return inputs._replace(held_out=_held_out(data, inputs, pieces))


def _held_out(data: DataSettings, inputs: Inputs, pieces: list) -> str:
  """The validation split in words."""
  if data.val_fraction == 0:
    return "validation: off (data.val_fraction=0)"
  val_docs = inputs.eval_sets.get("", [])
  unit = "files' documents" if inputs.train_files else "pieces" if pieces else "documents"
  held_out = f"validation: {len(val_docs)} {unit} held out"
  if inputs.train_docs is not None and data.format != "chat":
    chars = sum(map(len, val_docs))
    share = chars / max(1, chars + sum(map(len, inputs.train_docs)))
    held_out += f" ({chars:,} characters, {share:.1%} of the text)"
  if pieces:
    held_out += (f"; too few documents to hold out whole ones in {', '.join(pieces)}: cut "
                 f"at line breaks into pieces of at most "
                 f"{validation_piece_chars(data.chunk_chars):,} characters")
  return held_out


def eval_batches(inputs: Inputs, data: DataSettings, t: TrainSettings) -> Callable:
  """docs -> this process's batches of them, in order, once."""
  local = dict(seq_len=t.seq_len, batch_size=t.batch_size // jax.process_count(),
               seed=data.seed, process_index=jax.process_index(),
               process_count=jax.process_count(), shuffle=False, repeat=False)
  if data.format == "chat":
    return lambda examples: make_chat_pipeline(examples, **local)
  return lambda docs: make_pipeline(docs, inputs.tokenizer, **local)


def train_batches(inputs: Inputs, data: DataSettings, t: TrainSettings):
  """A fresh iterator over this process's training batches (a grain iterator, whose position a
  checkpoint saves)."""
  seed = data.seed if data.order_seed < 0 else data.order_seed
  local = dict(seq_len=t.seq_len, batch_size=t.batch_size // jax.process_count(), seed=seed,
               process_index=jax.process_index(), process_count=jax.process_count())
  if data.format == "chat":
    return make_chat_pipeline(inputs.train_docs, **local)
  if inputs.train_groups is not None:
    return make_block_pipeline(inputs.train_groups, inputs.tokenizer, **local)
  if inputs.train_files is not None:
    return make_file_pipeline(inputs.train_files, inputs.tokenizer,
                              chunk_chars=data.chunk_chars, **local)
  return make_pipeline(inputs.train_docs, inputs.tokenizer, **local)
