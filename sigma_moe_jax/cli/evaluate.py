r"""Evaluates a trained run by log-likelihood and writes the result as JSON.

  python -m sigma_moe_jax.cli.evaluate --workdir=runs/cpu_tiny \
      --task=data/tasks/shakespeare_next_line.jsonl
  python -m sigma_moe_jax.cli.evaluate --workdir=runs/cpu_tiny --task=data/shakespeare.jsonl.gz
  python -m sigma_moe_jax.cli.evaluate --workdir=runs/cpu_tiny --task=... --untrained  # chance
  python -m sigma_moe_jax.cli.evaluate --workdir=runs/cpu_tiny_sft --chat \
      --task=data/tasks/shakespeare_instruct.jsonl

A task file of JSON lines {"context": ..., "choices": [...], "label": i} is multiple choice (each
choice is appended to its context as written); with --chat, each line's "messages" (a
conversation up to the question) are rendered with the run's chat template (data.chat_template)
and its generation prompt, and each choice is scored as the assistant's reply (a JSONL of
conversations with --chat gets the negative log-likelihood of its assistant replies instead):
accuracy by summed and by length-normalised log-likelihood of each choice given its context,
with standard errors. Any other file the data pipeline reads (.txt, .jsonl with "text", .gz)
is a corpus: perplexity and bits per byte, in windows of the run's training context (or
--context tokens: a longer one checks a context extension). Records with a "task" field are
also scored per task. The result goes to --out (default <workdir>/eval/<task name>.json) and is
printed; beside it, <name>.examples.jsonl holds one record per example, so that a result can be
audited and compared with another harness example by example: multiple choice, the context's
SHA-256, each choice's log-likelihood and token count, both predictions, the label; corpora, each
document's summed NLL, predicted tokens and bytes; conversations, each one's reply NLL and tokens.
The aggregates recompute from it.
"""

import hashlib
import json
import sys
from typing import Any, List, NamedTuple, Optional, Tuple

import jax
import numpy as np
from absl import flags
from flax import nnx

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data import chat as chat_lib
from sigma_moe_jax.data.chat import ChatTemplate
from sigma_moe_jax.data.pipeline import load_documents, split_documents, validation_piece_chars
from sigma_moe_jax.inference import generate, scoring
from sigma_moe_jax.inference.load import load_run, token_byte_lengths
from sigma_moe_jax.infra import storage

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_TASK = flags.DEFINE_string("task", None, "Multiple-choice JSONL, or a corpus.")
_OUT = flags.DEFINE_string("out", None, "Result JSON (default: <workdir>/eval/<task>.json).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Score the freshly initialised model.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")
_MOE_TOP_K = flags.DEFINE_string("moe_top_k", "", "Experts per token in each layer (default: "
                                 "the last phase of the run's schedule).")
_CHAT = flags.DEFINE_bool("chat", False, "Multiple choice in the chat format: each record's "
                          "messages, rendered with the run's chat template, are the context.")
_CONTEXT = flags.DEFINE_integer("context", 0, "Tokens per window (0: the run's seq_len).")
_HELDOUT = flags.DEFINE_bool("heldout", False, "Corpus only: score the documents the run's "
                             "data split held out (data.val_fraction, data.seed).")
flags.mark_flags_as_required(["workdir", "task"])


def read_choice_task(path: str, chat: bool = False) -> List[Tuple[object, List[str], int, str]]:
  """(context, choices, label, task) per line: the context is a string, or with `chat` the
  record's messages; one error naming the line for anything malformed."""
  examples = []
  with storage.open_file(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        choices, label = record["choices"], record["label"]
        context = (chat_lib.messages_of(record, f"{path} line {number}") if chat
                   else record["context"])
      except (KeyError, TypeError) as e:
        raise ValueError(f"{path} line {number}: not a {{{'messages' if chat else 'context'}, "
                         f"choices, label}} record ({type(e).__name__})") from None
      except json.JSONDecodeError:
        raise ValueError(f"{path} line {number}: invalid JSON") from None
      if chat and context[-1]["role"] == "assistant":
        raise ValueError(f"{path} line {number}: the messages end with an assistant reply; "
                         f"the choices are that reply")
      if (not isinstance(context, (str, list)) or not isinstance(choices, list)
          or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{path} line {number}: needs a context string and at least two "
                         f"non-empty choice strings")
      if not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{path} line {number}: label {label!r} is not an index into its "
                         f"{len(choices)} choices")
      examples.append((context, choices, label, str(record.get("task", ""))))
  if not examples:
    raise ValueError(f"{path} holds no example")
  return examples


def reply_loss(examples, logprob_fn, *, batch_size: int, width: int, records=None) -> dict:
  """Negative log-likelihood of the assistant replies (the loss-mask targets) of encoded
  conversations, one per row: per reply token over all, and per conversation (its mean over its
  reply tokens) averaged, with the standard error over conversations."""
  sums, counts = [], []
  records = [] if records is None else records
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    segments, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, e in enumerate(chunk):
      tokens[row, :len(e.tokens)], mask[row, :len(e.tokens)] = e.tokens, e.loss_mask
      segments[row, :len(e.tokens)] = 1
    logprobs = np.asarray(logprob_fn(tokens, segments))
    for row in range(len(chunk)):
      targets = mask[row, 1:] > 0
      sums.append(-float(logprobs[row][targets].sum()))
      counts.append(int(targets.sum()))
      records.append({"nll": sums[-1], "tokens": counts[-1]})
  per_conversation = np.asarray(sums) / np.asarray(counts)
  return {"conversations": len(examples), "reply_tokens": int(sum(counts)),
          "nll_per_reply_token": sum(sums) / sum(counts),
          "nll_per_conversation": float(per_conversation.mean()),
          "nll_per_conversation_stderr": float(per_conversation.std(ddof=1)
                                               / np.sqrt(len(examples)))}


def digest(context) -> str:
  """SHA-256 of a context as written (a string, or a conversation as compact JSON)."""
  text = context if isinstance(context, str) else json.dumps(context, sort_keys=True,
                                                             separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def choice_records(examples, scores) -> List[dict]:
  """One record per multiple-choice example: what `scoring.accuracy` decides from."""
  records = []
  for index, ((context, _, label, task), choices) in enumerate(zip(examples, scores)):
    loglik = [s for s, _ in choices]
    lengths = [n for _, n in choices]
    by_sum = int(np.argmax(loglik))
    by_mean = int(np.argmax([s / n for s, n in choices]))
    records.append({"index": index, "context_sha256": digest(context), "task": task,
                    "label": label, "loglikelihoods": loglik, "choice_tokens": lengths,
                    "prediction": by_sum, "prediction_length_normalised": by_mean,
                    "correct": by_sum == label})
  return records


def is_choice_task(path: str) -> bool:
  if not path.endswith(".jsonl"):
    return False
  with storage.open_file(path) as f:
    first = next((line for line in f if line.strip()), "")
  try:
    return "choices" in json.loads(first)
  except ValueError:
    return False


class Inputs(NamedTuple):
  task: str
  kind: str  # "choices", "conversations" or "corpus"
  examples: Optional[list]  # a choice task's examples
  documents: Optional[list]  # a corpus's documents (the held-out ones with --heldout)
  run: Any


def read_inputs() -> Inputs:
  """The task and the run, checked; ValueError naming what is wrong."""
  task = cli_lib.project_path(_TASK.value)
  if not storage.exists(task) and "*" not in task:
    raise ValueError(f"task file {task!r} not found")
  if _BATCH.value < 1:
    raise ValueError("--batch_size must be >= 1")
  if _CONTEXT.value < 0:
    raise ValueError("--context must be >= 0 (0: the run's seq_len)")
  choice_task = storage.isfile(task) and is_choice_task(task)
  kind = "choices" if choice_task else "conversations" if _CHAT.value else "corpus"
  if _HELDOUT.value and kind != "corpus":
    raise ValueError("--heldout selects documents of a corpus; a task file has none")
  examples = read_choice_task(task, _CHAT.value) if choice_task else None
  documents = load_documents(task) if kind == "corpus" else None
  run = load_run(_WORKDIR.value, step=_STEP.value, top_k=_MOE_TOP_K.value,
                 untrained=_UNTRAINED.value)
  if _HELDOUT.value:
    data = run.settings.data
    documents = split_documents(documents, data.val_fraction, data.seed,
                                validation_piece_chars(data.chunk_chars))[1]
    if not documents:
      raise ValueError(f"the run holds out no document (data.val_fraction "
                       f"{data.val_fraction})")
  return Inputs(task, kind, examples, documents, run)


def score_choices(examples, run, template, logprob_fn, width: int):
  """(accuracy results, with per-task ones when the examples name tasks; per-example records)."""
  encode = run.tokenizer.encode
  if template is not None:
    contexts = [chat_lib.prompt_ids(c, template, run.tokenizer) for c, _, _, _ in examples]
  else:
    contexts = [encode(c) for c, _, _, _ in examples]
  encoded = [(context, [encode(choice) for choice in choices])
             for context, (_, choices, _, _) in zip(contexts, examples)]
  scores = scoring.choice_scores(encoded, logprob_fn, width=width, batch_size=_BATCH.value)
  labels = [label for _, _, label, _ in examples]
  result = scoring.accuracy(scores, labels)
  tasks = sorted({name for _, _, _, name in examples if name})
  if tasks:
    result["by_task"] = {name: scoring.accuracy(
        [s for s, e in zip(scores, examples) if e[3] == name],
        [l for l, e in zip(labels, examples) if e[3] == name]) for name in tasks}
  return result, choice_records(examples, scores)


def score_corpus(documents, run, logprob_fn, width: int):
  """(perplexity and bits per byte, per-document records)."""
  docs = [run.tokenizer.encode(doc) + [run.tokenizer.eos_id] for doc in documents]
  records = []
  result = scoring.corpus_perplexity(docs, token_byte_lengths(run.tokenizer), logprob_fn,
                                     width=width, batch_size=_BATCH.value, per_document=records)
  return result, [{"index": i, "text_sha256": digest(doc), **r}
                  for i, (doc, r) in enumerate(zip(documents, records))]


def output_path(task: str, step: int, width: int, context: int) -> str:
  """--out, or <workdir>/eval/<task>_step<N>[_chat][_heldout][_context<W>].json."""
  return storage.resolve(_OUT.value or storage.join(
      _WORKDIR.value, "eval", storage.basename(task).split(".")[0]
      + ("_untrained" if _UNTRAINED.value else f"_step{step}")
      + ("_chat" if _CHAT.value else "") + ("_heldout" if _HELDOUT.value else "")
      + (f"_context{width}" if width != context else "") + ".json"))


def evaluate() -> dict:
  inputs = read_inputs()
  run = inputs.run

  @jax.jit
  def logprob_fn(tokens, segment_ids):
    model = nnx.merge(run.graphdef, run.params)
    return generate.token_logprobs(model, tokens, segment_ids, run.top_k)

  width = _CONTEXT.value or run.context
  template = ChatTemplate.load(run.settings.data.chat_template) if _CHAT.value else None
  if inputs.kind == "choices":
    result, records = score_choices(inputs.examples, run, template, logprob_fn, width)
  elif inputs.kind == "conversations":
    examples = chat_lib.load_examples([inputs.task], template, run.tokenizer, max_len=width)
    records = []
    result = reply_loss(examples, logprob_fn, batch_size=_BATCH.value, width=width,
                        records=records)
    records = [{"index": i, **r} for i, r in enumerate(records)]
  else:
    result, records = score_corpus(inputs.documents, run, logprob_fn, width)
  result = {"task": _TASK.value, "workdir": _WORKDIR.value, "step": run.step,
            "untrained": _UNTRAINED.value, "chat": _CHAT.value, "context": width,
            "heldout": _HELDOUT.value, "top_k": [int(k) for k in run.top_k], **result}
  out = output_path(inputs.task, run.step, width, run.context)
  examples_out = (out[:-len(".json")] if out.endswith(".json") else out) + ".examples.jsonl"
  result["examples_file"] = storage.basename(examples_out)
  storage.makedirs(storage.parent(out))
  storage.write_text(examples_out, "".join(json.dumps(r) + "\n" for r in records))
  storage.write_text(out, json.dumps(result, indent=1))
  return result


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    result = evaluate()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(result, indent=1))


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
