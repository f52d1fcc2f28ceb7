"""The quickstart: cpu_tiny on the shipped Shakespeare corpus, a few minutes on 2 CPU cores."""

from experiments.configs.base import make_config
from sigma_moe_jax import ModelConfig


def get_config():
  c = make_config(ModelConfig.cpu_tiny())
  c.train.update(steps=1200, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=50,
                 log_every=20, eval_every=300, eval_batches=8, checkpoint_every=300)
  c.data.chunk_chars = 1000  # whole plays would fill ~100 consecutive batches each
  return c
