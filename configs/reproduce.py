"""The model and training run that every reproduction study starts from (experiments/reproduce.py).

8 layers of 32 fine-grained experts, top-1, the paper's LBL coefficient; about 6 minutes per run on
2 CPU cores. A study changes only what it compares (experiments/studies/).
"""

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.training.run_config import make_config


def get_config():
  c = make_config(ModelConfig.cpu_tiny(num_layers=8, num_experts=32, d_ff=128, top_k=1,
                                       capacity_factor=2.0))
  c.train.update(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30,
                 # every step: the switch studies compare per-step losses on the same batches
                 log_every=1, eval_every=50, eval_batches=16,
                 # every 10% of the run, all kept: the progressive study branches at 90%
                 checkpoint_every=60, keep_checkpoints=11)
  c.data.chunk_chars = 1000
  c.balance.coef = 1e-3
  return c
