"""Context extension of the quickstart run: continued at twice its sequence length (256) with
YaRN scaling of its RoPE (factor 2 over the 128 positions it was trained on), on the same corpus
cut into longer pieces so that positions past 128 occur. Train the quickstart first:

  python -m sigma_moe_jax.cli.train --config=configs/extend_cpu_tiny.py --workdir=runs/cpu_tiny_256

Only the rotary frequencies change (model.rope_*); the run starts from the quickstart's
parameters with a fresh optimizer and data stream.
"""

from sigma_moe_jax.training.run_config import load_config, sibling


def get_config():
  c = load_config(sibling(__file__, "cpu_tiny.py"))
  c.model.update(rope_scaling="yarn", rope_scaling_factor=2.0, rope_original_len=128)
  # As many tokens per step as the quickstart: half the rows, twice as long.
  c.train.update(steps=200, batch_size=4, seq_len=256, lr=1e-3, warmup_steps=20, log_every=20,
                 eval_every=100, eval_batches=8, checkpoint_every=100,
                 init_from="runs/cpu_tiny", init_mode="params")
  c.data.chunk_chars = 4000
  return c
