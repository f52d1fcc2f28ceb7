r"""Imports a Hugging Face Qwen3-MoE checkpoint directory as a run that can be trained on.

  python -m sigma_moe_jax.cli.import_hf --hf_dir=path/to/qwen3_moe --workdir=runs/imported \
      [--config=configs/cpu_tiny.py --config.train.steps=...]

Reads config.json and the safetensors weights (one file, or shards with their index; per-expert
or fused expert tensors), refuses, by name, the features this model lacks (sliding windows,
dense layers, shared experts, attention biases, scaled RoPE), and writes to `--workdir`:
  checkpoints/0/   the model with a fresh optimizer state and no data position;
  tokenizer.json   the model's tokenizer, when the directory has one;
  config.py        the config to continue with: --config's training, data and mesh settings
                   (the defaults without it) and the imported model.
Then `sigma_moe_jax.cli.generate --workdir=<workdir>` samples from it, and
  python -m sigma_moe_jax.cli.train --config=<workdir>/config.py \
      --config.train.init_from=<workdir> --workdir=runs/finetune
trains it, starting from step 0 and from the beginning of the data.
"""

import sys

from absl import flags
from ml_collections import config_flags

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import storage
from sigma_moe_jax.interop.hf_runs import import_model
from sigma_moe_jax.training.run_config import make_config

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Directory with config.json and safetensors.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to create.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training settings to continue with "
                                          "(default: the defaults of every key).")
flags.mark_flags_as_required(["hf_dir", "workdir"])

def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  workdir = storage.resolve(_WORKDIR.value)
  try:
    if storage.listdir(storage.join(workdir, "checkpoints")):
      raise ValueError(f"{workdir} already holds checkpoints; import into a new --workdir")
    if not storage.isfile(storage.join(_HF_DIR.value, "config.json")):
      raise ValueError(f"--hf_dir {_HF_DIR.value}: no config.json there")
    base = _CONFIG.value if _CONFIG.value is not None else make_config(ModelConfig())
    config = import_model(storage.resolve(_HF_DIR.value), workdir, base)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  m = config["model"]
  print(f"imported {_HF_DIR.value} into {workdir}: {m['num_layers']} layers, d_model "
        f"{m['d_model']}, {m['num_experts']} experts (top-{m['top_k']}); continue with "
        f"--config={storage.join(workdir, 'config.py')} --config.train.init_from={workdir}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
