"""gpu_small (about 1.6B parameters, 96 experts, top-1) on one 80 GB GPU, bf16 compute."""

from experiments.configs.base import make_config
from sigma_moe_jax import ModelConfig


def get_config():
  c = make_config(ModelConfig.gpu_small(dtype="bfloat16", dispatch="ragged", remat="full"))
  c.train.update(steps=20_000, batch_size=64, seq_len=2048, lr=1e-3, warmup_steps=1000,
                 log_every=20, eval_every=1000, eval_batches=32, checkpoint_every=1000)
  c.schedule.top_k = "0:[8,8,6,6,4,4,2,2,1,1]; 0.9:[1]*10"
  return c
