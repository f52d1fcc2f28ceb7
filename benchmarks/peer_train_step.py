"""Our full train step against the PyTorch peer on the same CPU, the same shapes and tokens:
Hugging Face transformers' `Qwen3MoeForCausalLM` (grouped_mm experts, its router aux loss, AdamW,
gradient clipping) against `make_train_step` (padded dispatch, global-batch LBL, AdamW, clipping),
both on 2 threads, timed in alternation in one run.

  python -m benchmarks.peer_train_step [--repeats 8] [--shapes cpu_tiny,d512]

Prints per shape the median step time, tokens/s and the ratio (ours / theirs in tokens/s: above
1.0 we are faster) for ours with the layer scan and with the layers unrolled (`scan_layers`),
the float32 matmul rate of each library measured in the same run, and each side's MFU against
its own matmul rate (model FLOPs as the trainer counts them).
"""

import argparse
import os
import time

import numpy as np

SHAPES = {
    # cpu_tiny: the quickstart's model and batch.
    "cpu_tiny": dict(vocab=4096, d_model=128, layers=6, heads=4, kv_heads=2, head_dim=32,
                     experts=32, d_ff=128, batch=8, seq=128, capacity=2.0),
    # A larger CPU shape: attention, norms and the head weigh more.
    "d512": dict(vocab=4096, d_model=512, layers=4, heads=8, kv_heads=2, head_dim=64,
                 experts=32, d_ff=256, batch=8, seq=512, capacity=1.25),
}
LBL_COEF = 1e-3


def model_config(shape, scan_layers: bool = True):
  from sigma_moe_jax import ModelConfig
  return ModelConfig(scan_layers=scan_layers, vocab_size=shape["vocab"], d_model=shape["d_model"],
                     num_layers=shape["layers"], num_heads=shape["heads"],
                     num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"],
                     num_experts=shape["experts"], d_ff=shape["d_ff"], top_k=1,
                     capacity_factor=shape["capacity"], dispatch="padded")


def ours(shape, tokens, with_hlo: bool = False, scan_layers: bool = True):
  import jax
  import jax.numpy as jnp
  from benchmarks.common import train_step_call
  from sigma_moe_jax.layers import positions_from_segments
  cfg = model_config(shape, scan_layers)
  tokens = jnp.asarray(tokens, jnp.int32)
  segments = jnp.ones_like(tokens)
  batch = {"tokens": tokens, "segment_ids": segments,
           "positions": positions_from_segments(segments)}
  call = train_step_call(cfg, batch, with_hlo=with_hlo)
  if with_hlo:  # (call, the compiled step's HLO text)
    return (lambda: jax.block_until_ready(call[0]())), call[1]
  return lambda: jax.block_until_ready(call())


def theirs(shape, tokens):
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
  config = Qwen3MoeConfig(
      vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
      moe_intermediate_size=shape["d_ff"], num_hidden_layers=shape["layers"],
      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
      head_dim=shape["head_dim"], num_experts=shape["experts"], num_experts_per_tok=1,
      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
      output_router_logits=True, router_aux_loss_coef=LBL_COEF, tie_word_embeddings=False,
      max_position_embeddings=max(4096, shape["seq"]), attn_implementation="sdpa",
      experts_implementation="grouped_mm")
  torch.manual_seed(0)
  model = Qwen3MoeForCausalLM(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1)
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)

  def step():
    loss = model(input_ids=ids, labels=ids).loss  # cross-entropy + aux loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
  return step


def matmul_rates():
  import jax
  import jax.numpy as jnp
  import torch
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  t = torch.ones(1024, 1024)
  rates = []
  for call in (lambda: f(a).block_until_ready(), lambda: t @ t):
    call()
    start = time.perf_counter()
    for _ in range(20):
      call()
    rates.append(2 * 1024**3 * 20 / (time.perf_counter() - start))
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  args = parser.parse_args()
  import torch
  from benchmarks.common import time_interleaved
  torch.set_num_threads(2)
  jax_rate, torch_rate = matmul_rates()
  print(f"float32 matmul 1024^3: jax {jax_rate / 1e9:.0f} GFLOP/s, torch "
        f"{torch_rate / 1e9:.0f} GFLOP/s (threads: torch {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()})")
  from sigma_moe_jax.infra.metrics import flops_per_token
  print(f"{'shape':20s} {'ours ms':>9s} {'theirs ms':>10s} {'ours tok/s':>11s} "
        f"{'theirs tok/s':>13s} {'ours / theirs':>14s} {'ours MFU':>9s} {'theirs MFU':>11s}")
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    tokens = np.random.default_rng(0).integers(0, shape["vocab"], (shape["batch"], shape["seq"]))
    # Ours with the layer scan (the default) and with the layers unrolled (scan_layers=False).
    calls = [ours(shape, tokens), ours(shape, tokens, scan_layers=False), theirs(shape, tokens)]
    # In alternation, each timed step after an untimed one of its own: a step right after the
    # other library's finds that library's threads still spinning (`common.time_interleaved`).
    *ours_s, theirs_s = time_interleaved(calls, repeats=args.repeats, untimed_first=True)
    n = shape["batch"] * shape["seq"]
    # MFU: the model's training FLOPs (6 x activated matmul parameters + attention, as the
    # trainer counts them) per second over each library's own measured matmul rate.
    flops = n * flops_per_token(model_config(shape), shape["seq"])
    for layers, seconds in zip(("scan", "unrolled"), ours_s):
      print(f"{name + ', ' + layers:20s} {seconds * 1e3:9.1f} {theirs_s * 1e3:10.1f} "
            f"{n / seconds:11.0f} {n / theirs_s:13.0f} {theirs_s / seconds:13.2f}x "
            f"{flops / seconds / jax_rate:9.1%} {flops / theirs_s / torch_rate:11.1%}",
            flush=True)


if __name__ == "__main__":
  main()
