"""Generation speed of cpu_tiny: prefill and cached decoding against the baseline of one full
forward pass over the whole sequence per new token, at batch 1 and 8, measured side by side.

  python -m benchmarks.generate [--prompt_len 32 --new_tokens 64 --repeats 5]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import time_interleaved
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.inference import generate
from sigma_moe_jax.training import step as train_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cfg = generate.inference_config(ModelConfig.cpu_tiny())
  graphdef, params = train_lib.init_model(cfg, 0)
  top_k = jnp.full((cfg.num_layers,), cfg.top_k, jnp.int32)
  prefill, decode = generate.make_generate(graphdef, args.new_tokens,
                                           generate.Sampling(temperature=0), eos_id=None)
  width = args.prompt_len + args.new_tokens

  @jax.jit
  def forward_next(params, tokens, position):
    logits, _ = nnx.merge(graphdef, params)(tokens, top_k=top_k)
    return jnp.argmax(logits[:, position], axis=-1)

  print(f"cpu_tiny, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
        f"{jax.devices()[0].platform}")
  print("| batch | prefill tokens/s | decode tokens/s | full forward per token, tokens/s | "
        "decode speed-up |\n|---|---|---|---|---|")
  for batch in (1, 8):
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt_len))
    tokens, lengths = generate.pad_prompts(prompts.tolist())
    logits, cache = prefill(params, tokens, lengths, top_k)
    key = jax.random.key(0)

    def baseline():
      seq = np.zeros((batch, width), np.int32)
      seq[:, :args.prompt_len] = prompts
      for position in range(args.prompt_len - 1, width - 1):
        seq[:, position + 1] = np.asarray(forward_next(params, seq, position))
      return seq

    run_prefill = lambda: prefill(params, tokens, lengths, top_k)
    run_decode = lambda: decode(params, logits, cache, lengths, top_k, key)
    prefill_s, decode_s, baseline_s = time_interleaved([run_prefill, run_decode, baseline],
                                                       repeats=args.repeats, warmup=1)
    decoded = batch * args.new_tokens
    print(f"| {batch} | {batch * args.prompt_len / prefill_s:,.0f} | {decoded / decode_s:,.0f} | "
          f"{decoded / baseline_s:,.0f} | {baseline_s / decode_s:.1f}x |")


if __name__ == "__main__":
  main()
