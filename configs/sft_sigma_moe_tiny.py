"""Post-training of the paper's model: supervised fine-tuning on conversations, top-1 in every
layer (the progressive schedule ends before post-training), from a pre-trained run's parameters.

  python -m sigma_moe_jax.cli.train --config=configs/sft_sigma_moe_tiny.py:short ...
  python -m sigma_moe_jax.cli.train --config=configs/sft_sigma_moe_tiny.py:long ...

`short` fine-tunes at the pre-training context (4,096 tokens); `long` continues from the short
stage at 16,384 tokens, the RoPE stretched by YaRN (factor 4 over the 4,096 positions of
pre-training), as many tokens per step. Point data.path, data.eval_sets, data.tokenizer and
train.init_from at your files and runs.
"""

from sigma_moe_jax.training.run_config import load_config, sibling

STAGES = {"short": dict(seq_len=4096, batch_size=256, grad_accum=4),
          "long": dict(seq_len=16_384, batch_size=64, grad_accum=1)}


def get_config(stage: str = "short"):
  if stage not in STAGES:
    raise ValueError(f"sft_sigma_moe_tiny: unknown stage {stage!r}; one of {sorted(STAGES)}")
  c = load_config(sibling(__file__, "sigma_moe_tiny.py"))
  c.schedule.top_k = ""  # model.top_k (1) in every layer
  c.train.update(steps=4000, lr=2e-5, warmup_steps=100, min_lr_ratio=0.1, eval_every=500,
                 checkpoint_every=500, init_from="/path/to/pretrained_run", init_mode="params",
                 **STAGES[stage])
  c.data.update(format="chat", path="/path/to/sft/*.jsonl", val_fraction=0.01,
                truncate=True, chat_template="data/chat_template.jinja")
  if stage == "long":
    c.model.update(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_len=4096)
  return c
