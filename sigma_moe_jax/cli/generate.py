r"""Samples text from a trained run.

  python -m sigma_moe_jax.cli.generate --workdir=runs/cpu_tiny --prompt="ROMEO:" \
      [--max_new_tokens=64 --temperature=0.8 --top_p=0.95 --top_k=0 --seed=0 --step=-1
       --moe_top_k="[1]*6"]
  python -m sigma_moe_jax.cli.generate --workdir=runs/cpu_tiny --prompts_file=prompts.txt \
      --out=out.jsonl

Loads the run's config, tokenizer and latest (or --step) checkpoint, prints each continuation,
and reports prefill and decode tokens/s (compilation excluded). With --prompts_file (one prompt
per line) the results also go to --out as JSONL. With --chat each prompt is a user message:
it is rendered with the run's chat template (data.chat_template) and its generation prompt, and
the reply ends at the end-of-text token:

  python -m sigma_moe_jax.cli.generate --workdir=runs/cpu_tiny_sft --chat --temperature=0 \
      --prompt="Who speaks next in this scene?  ROMEO. But soft!"

(With --chat, write a line break inside a prompt as \n, in --prompt and in a --prompts_file.)
"""

import json
import sys
import time

import jax
from absl import flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data import chat
from sigma_moe_jax.data.chat import ChatTemplate
from sigma_moe_jax.inference import generate
from sigma_moe_jax.inference.load import load_run
from sigma_moe_jax.infra import storage

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_PROMPT = flags.DEFINE_string("prompt", None, "A prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line.")
_OUT = flags.DEFINE_string("out", None, "JSONL output (with --prompts_file).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same text.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_MOE_TOP_K = flags.DEFINE_string("moe_top_k", "", "Experts per token in each layer, e.g. "
                                 "'[1]*6' (default: the last phase of the run's schedule).")
_CHAT = flags.DEFINE_bool("chat", False, "Each prompt is a user message in the run's chat "
                          "template; the reply is generated as the assistant's.")
flags.mark_flag_as_required("workdir")


def read_prompts():
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise ValueError("give exactly one of --prompt and --prompts_file")
  if _PROMPT.value is not None:
    return [_PROMPT.value]
  try:
    text = storage.read_text(_PROMPTS_FILE.value)
    prompts = [line for line in text.splitlines() if line.strip()]
  except OSError as e:
    raise ValueError(f"cannot read --prompts_file: {e}") from None
  if not prompts:
    raise ValueError(f"--prompts_file {_PROMPTS_FILE.value!r} holds no prompt")
  return prompts


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    prompts = read_prompts()
    sampling = generate.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    if _MAX_NEW.value < 1:
      raise ValueError("--max_new_tokens must be >= 1")
    run = load_run(_WORKDIR.value, step=_STEP.value, top_k=_MOE_TOP_K.value)
    if _CHAT.value:
      template = ChatTemplate.load(run.settings.data.chat_template)
      prompts = [p.replace("\\n", "\n") for p in prompts]
      encoded = [chat.prompt_ids([{"role": "user", "content": p}], template, run.tokenizer)
                 for p in prompts]
    else:
      encoded = [run.tokenizer.encode(p) for p in prompts]
    for prompt, ids in zip(prompts, encoded):
      if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
      if len(ids) + _MAX_NEW.value > run.context:
        raise ValueError(f"prompt {prompt[:40]!r}... has {len(ids)} tokens; with "
                         f"--max_new_tokens={_MAX_NEW.value} that exceeds the model's context "
                         f"of {run.context} (train.seq_len)")
  except ValueError as e:
    sys.exit(f"error: {e}")

  prefill, decode = generate.make_generate(run.graphdef, _MAX_NEW.value, sampling,
                                           run.tokenizer.eos_id)
  tokens, lengths = generate.pad_prompts(encoded)
  key = jax.random.key(_SEED.value)
  args = (run.params, tokens, lengths, run.top_k, run.selection_bias)
  prefill_compiled = prefill.lower(*args).compile()
  start = time.perf_counter()
  logits, cache = jax.block_until_ready(prefill_compiled(*args))
  prefill_seconds = time.perf_counter() - start
  decode_args = (run.params, logits, cache, lengths, run.top_k, key, run.selection_bias)
  decode_compiled = decode.lower(*decode_args).compile()
  start = time.perf_counter()
  out, generated = jax.block_until_ready(decode_compiled(*decode_args))
  decode_seconds = time.perf_counter() - start

  records = []
  for prompt, row, count in zip(prompts, out.tolist(), generated.tolist()):
    ids = row[:count]
    if ids and ids[-1] == run.tokenizer.eos_id:
      ids = ids[:-1]
    text = run.tokenizer.decode(ids)
    records.append({"prompt": prompt, "completion": text, "tokens": count})
    print(f"{prompt}\n>>> {text}\n" if _CHAT.value else f"{prompt}{text}\n")
  print(f"step {run.step} | prefill {int(lengths.sum()) / prefill_seconds:,.0f} tokens/s "
        f"({len(prompts)} prompts, {int(lengths.sum())} tokens) | decode "
        f"{int(generated.sum()) / decode_seconds:,.0f} tokens/s ({int(generated.sum())} tokens)")
  if _OUT.value:
    storage.write_text(_OUT.value, "".join(json.dumps(record) + "\n" for record in records))


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
