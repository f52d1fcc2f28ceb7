"""Every key a training config has, with its default. Config files start from `make_config`."""

import dataclasses

import ml_collections
from ml_collections import config_dict

from sigma_moe_jax import ModelConfig

# Fields whose default is None need a typed placeholder to be overridable from the command line.
_OPTIONAL_MODEL_FIELDS = {"head_dim": int, "capacity_factor": float}


def make_config(model: ModelConfig) -> ml_collections.ConfigDict:
  fields = dataclasses.asdict(model)
  # The static per-layer maximum top-k comes from the schedule, never from the config.
  fields.pop("layer_k_max")
  for name, kind in _OPTIONAL_MODEL_FIELDS.items():
    if fields[name] is None:
      fields[name] = config_dict.placeholder(kind)
  c = ml_collections.ConfigDict()
  c.model = fields
  c.train = dict(
      steps=1000, batch_size=8, seq_len=256, grad_accum=1,
      lr=3e-3, lr_schedule="wsd", warmup_steps=50, min_lr_ratio=0.1, decay_fraction=0.2,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
      log_every=10, eval_every=200, eval_batches=16,
      checkpoint_every=200, keep_checkpoints=3, async_checkpointing=True,
      seed=0, peak_flops=0.0,  # peak_flops 0: known chip table, else measured
      # init_from: another run's workdir to start from (its checkpoint at init_step, -1 the
      # latest) when this workdir has none: state, step and data position carry over.
      init_from="", init_step=-1)
  # chunk_chars > 0 cuts training documents into pieces of at most that many characters (at
  # line breaks) so that shuffled batches mix the corpus; validation keeps whole documents.
  # eval_sets "name=paths;name=paths": extra validation sets, logged as <name>_val_*.
  c.data = dict(path="data/shakespeare.jsonl.gz", tokenizer="data/shakespeare_bpe4096.json",
                val_fraction=0.05, seed=0, chunk_chars=0, eval_sets="")
  c.balance = dict(loss="lbl", coef=1e-3, z_loss_coef=0.0, loss_free=False, bias_rate=1e-3,
                   accumulate_counts=False)
  # Per-layer top-k phases, "start:per_layer; start:per_layer" (start: a step, or a fraction of
  # train.steps when it has a '.'). Empty: model.top_k in every layer.
  c.schedule = dict(topk="")
  # Mesh axis sizes; one may be -1 for the remaining devices. data, fsdp and expert split the
  # batch; expert also splits the experts, fsdp d_model of the weights, tensor d_ff and heads.
  c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
  return c
