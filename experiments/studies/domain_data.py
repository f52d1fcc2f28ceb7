"""Corpora some studies write under <workdir>/data: the two-domain corpus of the domains study
(English, the configured corpus, and Python source of equal size, each split into train and
validation files), and the configured corpus without line breaks (the token-frequency control).

`domain_paths` only names the files (variants read it to build their config); `prepare_domains`
writes them, once, and is run by the study runner before training.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import sysconfig
from typing import Dict, List

from sigma_moe_jax.data.pipeline import chunk_documents, load_documents, split_documents
from sigma_moe_jax.infra import storage

DOMAINS = ("english", "python")
SPLITS = ("train", "val")


def python_stdlib_documents(target_chars: int, seed: int) -> List[str]:
  """Source files of the standard library of the Python running this (tests, IDLE and
  site-packages left out), drawn in a seeded order until `target_chars` characters."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if not any(part in f for part in ("site-packages", "/test", "idlelib")))
  if not files:
    raise ValueError(f"no Python source files under {root}")
  random.Random(seed).shuffle(files)
  docs, chars = [], 0
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if text.strip():
      docs.append(text)
      chars += len(text)
    if chars >= target_chars:
      break
  return docs


def _write_jsonl(path: str, docs: List[str]):
  storage.write_bytes(path, gzip.compress("".join(json.dumps({"text": doc}) + "\n"
                                                  for doc in docs).encode("utf-8"), mtime=0))


def domain_paths(workdir: str) -> Dict[str, Dict[str, str]]:
  """{domain: {"train": path, "val": path}} under workdir; writes nothing."""
  directory = storage.join(workdir, "data")
  return {name: {split: storage.join(directory, f"{name}_{split}.jsonl.gz") for split in SPLITS}
          for name in DOMAINS}


def prepare_domains(config, workdir: str) -> Dict[str, Dict[str, str]]:
  """Writes the files of `domain_paths(workdir)` that are not there yet and returns their paths:
  the documents of `config.data.path` and as many characters of Python source, each split by
  `config.data.val_fraction` and `config.data.seed`."""
  paths = domain_paths(workdir)
  storage.makedirs(storage.join(workdir, "data"))
  english = load_documents(config.data.path)
  python = python_stdlib_documents(sum(map(len, english)), config.data.seed)
  for name, docs in (("english", english), ("python", python)):
    train, val = split_documents(docs, config.data.val_fraction, config.data.seed)
    for split, part in (("train", train), ("val", val)):
      path = paths[name][split]
      if not storage.exists(path):
        _write_jsonl(path, part)
  return paths


def no_newline_path(workdir: str) -> str:
  return storage.join(workdir, "data", "no_newline.jsonl.gz")


def prepare_no_newline(config, workdir: str) -> str:
  """Writes `config.data.path` cut into the pieces training cuts it into (data.chunk_chars), each
  line break replaced by a space, if not there yet: the end-of-line token, a tenth of the
  tokens, is gone (its text joins the next word). The file holds pieces, not whole plays, so a
  run on it holds out 5% of the pieces for validation where the original holds out whole plays:
  its validation loss is not comparable, its routing statistics are."""
  path = no_newline_path(workdir)
  if not storage.exists(path):
    if not config.data.chunk_chars:
      raise ValueError("the no-newline corpus needs data.chunk_chars > 0 (its pieces)")
    storage.makedirs(storage.join(workdir, "data"))
    pieces = chunk_documents(load_documents(config.data.path), config.data.chunk_chars)
    _write_jsonl(path, [piece.replace("\n", " ") for piece in pieces])
  return path
