"""Supervised fine-tuning of the quickstart run on the shipped instruction set (experiments/
build_instruction_set.py): conversations in the chat format of data/chat_template.jinja, loss on
the assistant replies only, several conversations packed to a row. Train the quickstart first:

  python -m sigma_moe_jax.cli.train --config=configs/cpu_tiny.py --workdir=runs/cpu_tiny
  python -m sigma_moe_jax.cli.train --config=configs/sft_cpu_tiny.py --workdir=runs/cpu_tiny_sft

The run starts from the quickstart's parameters (a fresh optimizer and data stream, step 0) and
validates on conversations from the two plays no run trains on (logged as heldout_val_*).
"""

from sigma_moe_jax.training.run_config import load_config, sibling


def get_config():
  c = load_config(sibling(__file__, "cpu_tiny.py"))
  c.train.update(steps=300, batch_size=16, seq_len=128, lr=1e-3, warmup_steps=20,
                 log_every=20, eval_every=100, eval_batches=8, checkpoint_every=100,
                 init_from="runs/cpu_tiny", init_mode="params")
  c.data.update(format="chat", path="data/sft/shakespeare_instruct.jsonl", val_fraction=0.0,
                chunk_chars=0, eval_sets="heldout=data/sft/shakespeare_instruct_heldout.jsonl")
  return c
