"""gpu_desk: a reduced Sigma-MoE (0.5B parameters, 64 experts, top-1) for one 24 GB card at a
researcher's desk (RTX 4090, L4, A10; RTX 3090 / A5000 likewise from Ampere on), bf16 compute.

The 24 GB check: `python -m sigma_moe_jax.cli.compile_check --config=configs/gpu_desk.py
--platform=cuda --gpu=rtx4090` (README "GPU"). These cards have no Mosaic GPU kernels: the
experts run on the Triton grouped matmul (dropless) and attention on XLA.
"""

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.training.run_config import make_config


def get_config():
  c = make_config(ModelConfig(vocab_size=32_768, d_model=768, num_layers=8, num_heads=12,
                              num_kv_heads=4, head_dim=64, num_experts=64, d_ff=384, top_k=1,
                              dtype="bfloat16", dispatch="ragged", remat="full"))
  c.train.update(steps=20_000, batch_size=32, seq_len=1024, grad_accum=2, lr=1e-3,
                 warmup_steps=1000, log_every=20, eval_every=1000, eval_batches=32,
                 checkpoint_every=1000)
  c.schedule.top_k = "0:[4,4,2,2,1,1,1,1]; 0.9:[1]*8"
  return c
