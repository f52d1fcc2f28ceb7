"""Evaluates a trained run by log-likelihood and writes the result as JSON.

  python -m experiments.evaluate --workdir=runs/cpu_tiny --task=data/tasks/shakespeare_next_line.jsonl
  python -m experiments.evaluate --workdir=runs/cpu_tiny --task=data/shakespeare.jsonl.gz
  python -m experiments.evaluate --workdir=runs/cpu_tiny --task=... --untrained   # chance baseline

A task file of JSON lines {"context": ..., "choices": [...], "label": i} is multiple choice (each
choice is appended to its context as written):
accuracy by summed and by length-normalised log-likelihood of each choice given its context,
with standard errors. Any other file the data pipeline reads (.txt, .jsonl with "text", .gz)
is a corpus: perplexity and bits per byte. The result goes to --out (default
<workdir>/eval/<task name>.json) and is printed.
"""

import json
import sys
from typing import List, Tuple

import jax
from absl import flags
from flax import nnx

from experiments import cli as cli_lib
from experiments.inference import load_run, token_byte_lengths
from sigma_moe_jax import generate, scoring, storage
from sigma_moe_jax.data import load_documents

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_TASK = flags.DEFINE_string("task", None, "Multiple-choice JSONL, or a corpus.")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: <workdir>/eval/<task>.json).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Score the freshly initialised model.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
_MOE_TOP_K = flags.DEFINE_string("moe_top_k", "", "Experts per token in each layer (default: "
                                 "the last phase of the run's schedule).")
flags.mark_flags_as_required(["workdir", "task"])


def read_choice_task(path: str) -> List[Tuple[str, List[str], int]]:
  """(context, choices, label) per line; one error naming the line for anything malformed."""
  examples = []
  with storage.open_file(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        context, choices, label = record["context"], record["choices"], record["label"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} line {number}: not a {{context, choices, label}} record "
                         f"({type(e).__name__})") from None
      if (not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{path} line {number}: needs a context string and at least two "
                         f"non-empty choice strings")
      if not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{path} line {number}: label {label!r} is not an index into its "
                         f"{len(choices)} choices")
      examples.append((context, choices, label))
  if not examples:
    raise ValueError(f"{path} holds no example")
  return examples


def is_choice_task(path: str) -> bool:
  if not path.endswith(".jsonl"):
    return False
  with storage.open_file(path) as f:
    first = next((line for line in f if line.strip()), "")
  try:
    return "choices" in json.loads(first)
  except ValueError:
    return False


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  task = cli_lib.project_path(_TASK.value)
  try:
    if not storage.exists(task) and "*" not in task:
      raise ValueError(f"task file {task!r} not found")
    if _BATCH.value < 1:
      raise ValueError("--batch_size must be >= 1")
    choice_task = storage.isfile(task) and is_choice_task(task)
    examples = read_choice_task(task) if choice_task else None
    documents = None if choice_task else load_documents(task)
    run = load_run(_WORKDIR.value, step=_STEP.value, top_k=_MOE_TOP_K.value,
                   untrained=_UNTRAINED.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")

  @jax.jit
  def logprob_fn(tokens, segment_ids):
    model = nnx.merge(run.graphdef, run.params)
    return generate.token_logprobs(model, tokens, segment_ids, run.top_k)

  encode = run.tokenizer.encode
  width = run.context
  if choice_task:
    encoded = [(encode(context), [encode(choice) for choice in choices])
               for context, choices, _ in examples]
    try:
      scores = scoring.choice_scores(encoded, logprob_fn, width=width, batch_size=_BATCH.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    result = scoring.accuracy(scores, [label for _, _, label in examples])
  else:
    docs = [encode(doc) + [run.tokenizer.eos_id] for doc in documents]
    result = scoring.corpus_perplexity(docs, token_byte_lengths(run.tokenizer), logprob_fn,
                                       width=width, batch_size=_BATCH.value)
  result = {"task": _TASK.value, "workdir": _WORKDIR.value, "step": run.step,
            "untrained": _UNTRAINED.value, "top_k": [int(k) for k in run.top_k], **result}
  out = storage.resolve(_OUT.value or storage.join(
      _WORKDIR.value, "eval", storage.basename(task).split(".")[0]
      + ("_untrained" if _UNTRAINED.value else f"_step{run.step}") + ".json"))
  storage.makedirs(storage.parent(out))
  storage.write_text(out, json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
