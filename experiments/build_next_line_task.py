"""Builds the shipped multiple-choice task: given a passage of a play, pick its true next line
among four lines of the same play.

  python -m experiments.build_next_line_task [--examples=400 --seed=0 \\
      --out=data/tasks/shakespeare_next_line.jsonl]

The plays are the validation split of the shipped corpus (data.val_fraction 0.05, data.seed 0,
as in every shipped config), so no training run has seen them. Each example: the 400 characters
before a line (ending with its line break) as context; the line and three other lines of the same
play as choices, in random order. Candidate lines are spoken text of 20 to 80 characters, not
speaker names or stage directions; the distractors differ from the true line.
"""

import json
import random
import sys

from absl import flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data.pipeline import load_documents, split_documents
from sigma_moe_jax.infra import storage

_EXAMPLES = flags.DEFINE_integer("examples", 400, "Number of examples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "data/tasks/shakespeare_next_line.jsonl", "Output JSONL.")
CONTEXT_CHARS = 400


def candidate_lines(play: str):
  """(character offset, line) of every spoken line of a suitable length."""
  lines, offset = [], 0
  for line in play.split("\n"):
    text = line.strip()
    spoken = (20 <= len(text) <= 80 and not text.isupper() and not text.startswith(("[", "Enter",
                                                                                      "Exit")))
    if spoken and offset >= CONTEXT_CHARS:
      lines.append((offset, text))
    offset += len(line) + 1
  return lines


def build(examples: int, seed: int):
  docs = load_documents(cli_lib.project_path("data/shakespeare.jsonl.gz"))
  _, plays = split_documents(docs, 0.05, 0)
  rng = random.Random(seed)
  per_play = [(play, candidate_lines(play)) for play in plays]
  records = []
  while len(records) < examples:
    play, lines = per_play[len(records) % len(per_play)]
    offset, true_line = rng.choice(lines)
    distractors = set()
    while len(distractors) < 3:
      other = rng.choice(lines)[1]
      if other != true_line:
        distractors.add(other)
    choices = [true_line] + sorted(distractors)
    rng.shuffle(choices)
    records.append({"context": play[offset - CONTEXT_CHARS:offset], "choices": choices,
                    "label": choices.index(true_line)})
  return records


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  records = build(_EXAMPLES.value, _SEED.value)
  storage.makedirs(storage.parent(storage.resolve(_OUT.value)))
  storage.write_text(_OUT.value, "".join(json.dumps(record) + "\n" for record in records))
  print(f"{len(records)} examples written to {_OUT.value}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
