"""Trains a byte-level BPE tokenizer on the training split of a corpus.

  python -m sigma_moe_jax.cli.train_tokenizer --data=data/shakespeare.jsonl.gz --vocab_size=4096 \
      --out=data/shakespeare_bpe4096.json

The validation documents (same `--val_fraction` and `--split_seed` as training) are left out,
so validation text stays unseen by the tokenizer as well as by the model.
"""


from absl import flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data import pipeline as data
from sigma_moe_jax.data import tokenizer
from sigma_moe_jax.infra import storage

_DATA = flags.DEFINE_string("data", None, "Path, comma-separated paths or glob of documents.",
                            required=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the tokenizer.json.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size, special token included.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.05, "Fraction of documents held out.")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the train/validation split.")
_CHUNK_CHARS = flags.DEFINE_integer("chunk_chars", 0, "The training config's data.chunk_chars: "
                                    "with too few documents to hold out whole ones, the same "
                                    "pieces are held out as in training.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def main(argv):
  del argv
  if storage.exists(_OUT.value) and not _OVERWRITE.value:
    raise SystemExit(f"{_OUT.value} exists; pass --overwrite to replace it")
  docs = data.load_documents(_DATA.value)
  train_docs, val_docs = data.split_documents(docs, _VAL_FRACTION.value, _SPLIT_SEED.value,
                                              data.validation_piece_chars(_CHUNK_CHARS.value))
  unit = "pieces" if data.holds_out_pieces(len(docs), _VAL_FRACTION.value) else "documents"
  print(f"training on {len(train_docs)} {unit} ({sum(map(len, train_docs)):,} chars); "
        f"{len(val_docs)} held out")
  tok = tokenizer.train_bpe(train_docs, _VOCAB_SIZE.value, _OUT.value)
  num_tokens = sum(len(tok.encode(d)) + 1 for d in train_docs)
  print(f"wrote {_OUT.value}: vocab_size={tok.vocab_size} eos_id={tok.eos_id}; "
        f"{num_tokens:,} training tokens (eos included)")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
