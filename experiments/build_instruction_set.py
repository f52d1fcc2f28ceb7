"""Builds the shipped instruction data from the shipped plays: two tasks a fine-tuned model
answers in the chat format (data/chat_template.jinja).

  python -m experiments.build_instruction_set [--train_examples=4000 --heldout_examples=400]

- "who speaks next": a passage of a scene (the end of the speeches before one), and the name of
  the character who speaks next;
- "continue the speech": a speaker's heading and the first line of a speech, and its next line.

Every conversation fits 128 tokens (the quickstart's context). Writes
- data/sft/shakespeare_instruct.jsonl: conversations from the plays of the training split (the
  works a pre-trained run has read), for fine-tuning;
- data/sft/shakespeare_instruct_heldout.jsonl: conversations from the validation split
  (data.val_fraction 0.05, data.seed 0: Love's Labour's Lost and Romeo and Juliet), which no run
  trains on: the fine-tuning run's validation set;
- data/tasks/shakespeare_instruct.jsonl: the same tasks on the held-out plays as multiple choice,
  each with the true answer and three others of the same play (speakers among the play's eight
  most frequent; lines of 20 to 80 characters), as `messages` for a chat model and as a plain
  `context` continued by each choice for a pre-trained one.
"""

import collections
import json
import random
import re
import sys

from absl import flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data.chat import ChatTemplate
from sigma_moe_jax.data.pipeline import load_documents, split_documents
from sigma_moe_jax.data.tokenizer import load_tokenizer
from sigma_moe_jax.infra import storage

_TRAIN = flags.DEFINE_integer("train_examples", 4000, "Fine-tuning conversations.")
_HELDOUT = flags.DEFINE_integer("heldout_examples", 400, "Held-out conversations and task "
                                "examples (each).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", "data", "Directory that receives sft/ and tasks/.")

PASSAGE_CHARS = 220  # the end of the scene a question shows
MAX_TOKENS = 128  # a whole conversation, in the shipped tokenizer and chat template
TOP_SPEAKERS = 8
LINE_CHARS = (20, 80)
WHO_PROMPT = "Who speaks next in this scene?\n\n"
CONTINUE_PROMPT = "Continue this speech with its next line.\n\n"
# A speaker's heading: a line of one to four words ending with a full stop ("ROMEO.", "Nurse.",
# "LADY CAPULET."), at the start of a block of lines.
_HEADING = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\. ?$")


def speeches(play: str):
  """(speaker, lines) of every speech, in order: blocks that start with a heading."""
  found = []
  for block in play.split("\n\n"):
    lines = [line.strip() for line in block.split("\n") if line.strip()]
    if len(lines) >= 2:
      heading = _HEADING.match(lines[0])
      if heading and not lines[1].startswith(("Enter", "Exit", "[")):
        found.append((heading.group(1), lines[1:]))
  return found


def _speech_text(speaker, lines):
  return f"{speaker}.\n" + "\n".join(lines)


def _is_line(text):
  return LINE_CHARS[0] <= len(text) <= LINE_CHARS[1]


def _who(spoken, i, rng, speakers):
  """The passage before speech i and its speaker, or None when the speech does not qualify."""
  speaker = spoken[i][0]
  if i < 2 or speaker not in speakers:
    return None
  before = "\n\n".join(_speech_text(*s) for s in spoken[max(0, i - 3):i])
  passage = before[-PASSAGE_CHARS:]
  passage = passage[passage.index("\n") + 1:] if "\n" in passage else passage
  others = rng.sample([s for s in speakers if s != speaker], 3)
  return passage, speaker, others


def _continue(spoken, i, rng, lines):
  speaker, text = spoken[i]
  if len(text) < 2 or not _is_line(text[0]) or not _is_line(text[1]):
    return None
  others = set()
  while len(others) < 3:
    other = rng.choice(lines)
    if other != text[1]:
      others.add(other)
  return f"{speaker}.\n{text[0]}", text[1], sorted(others)


def examples(plays, count: int, rng: random.Random, fits=lambda task, passage, answer: True):
  """`count` (task, passage, answer, three other answers) drawn alternately from each task and
  round-robin over the plays that have speeches; only those that `fits` accepts."""
  per_play = []
  for play in plays:
    spoken = speeches(play)
    if len(spoken) < 50:
      continue
    speakers = [s for s, _ in collections.Counter(s for s, _ in spoken).most_common(TOP_SPEAKERS)]
    lines = sorted({line for _, text in spoken for line in text if _is_line(line)})
    per_play.append((spoken, speakers, lines))
  drawn, seen = [], set()
  while len(drawn) < count:
    spoken, speakers, lines = per_play[len(drawn) % len(per_play)]
    task = ("who", "continue")[(len(drawn) // len(per_play)) % 2]
    i = rng.randrange(len(spoken))
    made = (_who(spoken, i, rng, speakers) if task == "who"
            else _continue(spoken, i, rng, lines))
    if made is None or (task, made[0]) in seen or not fits(task, *made[:2]):
      continue
    seen.add((task, made[0]))
    drawn.append((task, *made))
  return drawn


def conversation(task, passage, answer):
  prompt = WHO_PROMPT if task == "who" else CONTINUE_PROMPT
  return [{"role": "user", "content": prompt + passage},
          {"role": "assistant", "content": answer}]


def choice_record(task, passage, answer, others, rng):
  choices = [answer] + list(others)
  rng.shuffle(choices)
  # The plain form continues the play's text: after a speech, a blank line and the next
  # heading; inside a speech, the next line.
  context = passage + ("\n\n" if task == "who" else "\n")
  return {"task": task, "messages": conversation(task, passage, answer)[:1], "context": context,
          "choices": choices, "label": choices.index(answer)}


def build(train_examples: int, heldout_examples: int, seed: int):
  docs = load_documents(cli_lib.project_path("data/shakespeare.jsonl.gz"))
  train_plays, heldout_plays = split_documents(docs, 0.05, 0)
  rng = random.Random(seed)
  template = ChatTemplate.load(cli_lib.project_path("data/chat_template.jinja"))
  tokenizer = load_tokenizer(cli_lib.project_path("data/shakespeare_bpe4096.json"))

  def fits(task, passage, answer):  # the quickstart fine-tunes at its pre-training context
    return len(tokenizer.encode(template.render(conversation(task, passage, answer)))) <= \
        MAX_TOKENS
  train = [{"messages": conversation(t, p, a)}
           for t, p, a, _ in examples(train_plays, train_examples, rng, fits)]
  heldout = examples(heldout_plays, 2 * heldout_examples, rng, fits)
  val = [{"messages": conversation(t, p, a)} for t, p, a, _ in heldout[:heldout_examples]]
  task = [choice_record(*e, rng) for e in heldout[heldout_examples:]]
  return train, val, task


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  train, val, task = build(_TRAIN.value, _HELDOUT.value, _SEED.value)
  out = storage.resolve(_OUT.value)
  for name, records in (("sft/shakespeare_instruct.jsonl", train),
                        ("sft/shakespeare_instruct_heldout.jsonl", val),
                        ("tasks/shakespeare_instruct.jsonl", task)):
    path = storage.join(out, name)
    storage.makedirs(storage.parent(path))
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} records written to {path}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
