"""Exports a run to the Hugging Face Qwen3-MoE format (`Qwen3MoeForCausalLM`).

  python -m sigma_moe_jax.cli.export_hf --workdir=runs/cpu_tiny --out=exports/cpu_tiny [--step=-1
      --dtype=float32 --max_shard_size=4GB --moe_top_k="[1]*6"]

Writes config.json, generation_config.json, the weights as safetensors shards (with
model.safetensors.index.json when there is more than one), tokenizer.json and
tokenizer_config.json. The checkpoint is restored once; the tensors are converted and written
one layer at a time, so the export holds at most one layer and one shard beyond the model.
A model Qwen3-MoE cannot represent is refused with what differs (see sigma_moe_jax/interop/hf.py).
"""

import sys

from absl import flags

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.inference.load import load_run
from sigma_moe_jax.infra import storage
from sigma_moe_jax.interop.hf_runs import export, parse_size

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (local or gs://).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight dtype.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "4GB", "Largest safetensors file, e.g. 500MB.")
_MOE_TOP_K = flags.DEFINE_string("moe_top_k", "", "Experts per token in each layer (default: "
                                 "the last phase of the run's schedule); must be equal.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  out = storage.resolve(_OUT.value)
  try:
    max_shard_bytes = parse_size(_MAX_SHARD.value)
    if storage.listdir(out) and not _OVERWRITE.value:
      raise ValueError(f"--out {out} is not empty; pass --overwrite to write into it")
    run = load_run(_WORKDIR.value, step=_STEP.value, top_k=_MOE_TOP_K.value)
    index = export(run, out, dtype=_DTYPE.value, max_shard_bytes=max_shard_bytes)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  files = sorted(set(index["weight_map"].values()))
  print(f"exported step {run.step} of {_WORKDIR.value} to {out}: "
        f"{len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 1e6:,.1f} MB "
        f"in {len(files)} file(s)")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
