"""gpu_small (about 1.6B parameters, 96 experts, top-1) on one 80 GB GPU, bf16 compute.

Sized from XLA:GPU's own figures for an H100 (`sigma_moe_jax.cli.compile_check --platform=cuda
--gpu=h100`, README "GPU"): the whole batch of 64 x 2048 in one micro-batch needs 63.0 GB of the
card's 84.9 and XLA's rematerialisation pass reports that it could not get below 93.7 GiB on the
way; two micro-batches of 32 sequences halve the activations.
"""

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.training.run_config import make_config


def get_config():
  c = make_config(ModelConfig.gpu_small(dtype="bfloat16", dispatch="ragged", remat="full"))
  c.train.update(steps=20_000, batch_size=64, seq_len=2048, grad_accum=2, lr=1e-3,
                 warmup_steps=1000, log_every=20, eval_every=1000, eval_batches=32,
                 checkpoint_every=1000)
  c.schedule.top_k = "0:[8,8,6,6,4,4,2,2,1,1]; 0.9:[1]*10"
  return c
