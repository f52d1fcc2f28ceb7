"""The paper's model and schedule (20B total, 0.5B active) for a TPU pod: phase 1 activates
[8,8,6,6,4,4,2,2]+[1]*48 experts, then every layer is top-1 for the last 10% of steps."""

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.training.run_config import make_config


def get_config():
  c = make_config(ModelConfig.sigma_moe_tiny(dtype="bfloat16", dispatch="ragged", remat="full"))
  # grad_accum 4: on 64 v5p chips each micro-batch holds 4 sequences per chip. With 16 the
  # float32 logits alone ([tokens, 200k vocab]) take 52 GB a chip and XLA's plan needs 109 GB of
  # the 95 (sigma_moe_jax.cli.compile_check; README "Memory plan").
  c.train.update(steps=100_000, batch_size=1024, seq_len=4096, grad_accum=4, lr=3e-4,
                 warmup_steps=2000, log_every=10, eval_every=2000, eval_batches=64,
                 checkpoint_every=1000)
  c.schedule.top_k = "0:[8,8,6,6,4,4,2,2]+[1]*48; 0.9:[1]*56"
  # Experts over 8 devices, everything else fully sharded over the rest (see the memory plan).
  c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
  # Local (or mounted) files: point these at your corpus and the o200k_base ranks file.
  c.data.update(path="/path/to/corpus/*.jsonl", tokenizer="/path/to/o200k_base.tiktoken")
  return c
