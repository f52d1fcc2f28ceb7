"""Facts about a config's training corpus, as JSON (see experiments/studies/corpus.py for what is
counted and how).

  python -m experiments.corpus_report --out=docs/results/corpus.json
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from experiments.studies.corpus import corpus_facts
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import storage

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli_lib.project_path("configs/reproduce.py"),
    "The run whose corpus is described.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Write the JSON here (and print it).")
_TOP = flags.DEFINE_integer("top", 10, "How many of the most frequent tokens to list.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    facts = corpus_facts(_CONFIG.value, _TOP.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  text = json.dumps(facts, indent=1)
  if _OUT.value:
    storage.write_text(storage.resolve(_OUT.value), text + "\n")
  print(text)


if __name__ == "__main__":
  cli_lib.run(main)
