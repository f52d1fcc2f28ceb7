"""Checks an export against the run it came from, in `transformers` (needs torch and
transformers: requirements-test.txt).

  python -m experiments.check_hf --workdir=runs/cpu_tiny --hf_dir=exports/cpu_tiny \
      [--prompt="ROMEO:" --max_new_tokens=32]

Prints the largest logit difference over the prompt and both greedy continuations (this
project's cached decoder and `generate` in transformers); exits non-zero when the continuations
differ or the logits differ by more than --atol.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.inference import generate
from sigma_moe_jax.inference.load import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Its export (sigma_moe_jax.cli.export_hf --out).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:\nBut soft, what light through yonder window "
                              "breaks?", "Prompt of the comparison.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Greedy tokens to compare.")
_ATOL = flags.DEFINE_float("atol", 1e-3, "Largest logit difference accepted.")
flags.mark_flags_as_required(["workdir", "hf_dir"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    import torch  # noqa: PLC0415 -- optional dependencies of this tool only
    import transformers  # noqa: PLC0415
  except ImportError as e:
    sys.exit(f"error: {e.name} is not installed (pip install -r requirements-test.txt)")
  try:
    run = load_run(_WORKDIR.value, step=_STEP.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  model = transformers.Qwen3MoeForCausalLM.from_pretrained(_HF_DIR.value, dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(_HF_DIR.value)
  ids = run.tokenizer.encode(_PROMPT.value)
  if tokenizer(_PROMPT.value)["input_ids"] != ids:
    sys.exit("error: the exported tokenizer encodes the prompt differently")

  ours_model = nnx.merge(run.graphdef, run.params)
  ours_logits, _ = ours_model(jnp.asarray([ids], jnp.int32), top_k=run.top_k)
  with torch.no_grad():
    hf_logits = model(input_ids=torch.tensor([ids])).logits.numpy()
  gap = float(np.max(np.abs(np.asarray(ours_logits) - hf_logits)))

  prefill, decode = generate.make_generate(run.graphdef, _MAX_NEW.value,
                                           generate.Sampling(temperature=0.0), eos_id=None)
  tokens, lengths = generate.pad_prompts([ids])
  logits, cache = prefill(run.params, tokens, lengths, run.top_k)
  ours, _ = decode(run.params, logits, cache, lengths, run.top_k, jax.random.key(0))
  ours = np.asarray(ours)[0].tolist()
  theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=_MAX_NEW.value,
                          eos_token_id=None)[0, len(ids):].tolist()
  print(f"step {run.step}: {len(ids)} prompt tokens, largest logit difference {gap:.2e} "
        f"(logits span {float(np.ptp(hf_logits)):.1f})")
  print(f"this project : {run.tokenizer.decode(ours)!r}")
  print(f"transformers : {tokenizer.decode(theirs)!r}")
  same = ours == theirs
  print(f"greedy continuations {'identical' if same else 'DIFFER'} over {len(ours)} tokens")
  if not same or gap > _ATOL.value:
    sys.exit(1)


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
