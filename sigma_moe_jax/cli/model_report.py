"""Parameter counts of a preset (from shapes only) and, for small presets, a timed forward pass.

  python -m sigma_moe_jax.cli.model_report --preset=cpu_tiny
"""

import time

import jax
from absl import flags
from flax import nnx

from sigma_moe_jax import ModelConfig, Transformer, count_params
from sigma_moe_jax.cli import common as cli_lib

PRESETS = {"sigma_moe_tiny": ModelConfig.sigma_moe_tiny, "gpu_small": ModelConfig.gpu_small,
           "cpu_tiny": ModelConfig.cpu_tiny}

_PRESET = flags.DEFINE_enum("preset", "cpu_tiny", list(PRESETS), "Model preset.")
_FORWARD = flags.DEFINE_bool("forward", True, "Run a forward pass when the model is under 1B.")


def main(argv):
  del argv
  cfg = PRESETS[_PRESET.value]()
  counts = count_params(cfg)
  print(f"{_PRESET.value}: {cfg}")
  for name, value in counts.items():
    print(f"  {name:22s} {value:>16,d}  ({value / 1e9:.3f}B)")
  if _FORWARD.value and counts["total"] < 1e9:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
    tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, cfg.vocab_size)
    jax.block_until_ready(forward(params, tokens))
    start = time.perf_counter()
    logits, stats = jax.block_until_ready(forward(params, tokens))
    seconds = time.perf_counter() - start
    print(f"  forward of {tokens.size} tokens: {seconds * 1e3:.1f} ms; logits {logits.shape}; "
          f"tokens per expert in layer 0: {stats.counts.tokens_per_expert[0].tolist()}")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
