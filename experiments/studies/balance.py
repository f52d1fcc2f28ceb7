"""The balance search's candidates and its measurements (experiments/balance_search.py is the
launcher): which settings keep top-1 routing balanced in a small model."""

import json
from typing import Callable, Dict

import numpy as np
from flax import nnx

from sigma_moe_jax.data.pipeline import make_pipeline
from sigma_moe_jax.infra import storage
from sigma_moe_jax.training import run as training
from sigma_moe_jax.training import step as train_lib


def _set(**changes) -> Callable:
  """A candidate: dotted config keys and their values ("balance.coef": 1e-2)."""
  def apply(c):
    for key, value in changes.items():
      section, name = key.split(".")
      c[section][name] = value
  return apply


def _early_k(per_layer_k: int, until: float) -> Callable:
  """Every layer at top-`per_layer_k` until fraction `until` of the run, then top-1."""
  def apply(c):
    n = c.model.num_layers
    c.schedule.top_k = f"0:[{per_layer_k}]*{n}; {until}:[1]*{n}"
  return apply


# What the quickstart config had before this search changed it (its `base` candidate).
PAPER_BALANCE = _set(**{"model.capacity_factor": 2.0, "balance.coef": 1e-3})

CANDIDATES: Dict[str, Callable] = {
    "base": _set(),
    "base_seed1": _set(**{"train.seed": 1, "data.order_seed": 1}),  # the noise between runs
    # The LBL's weight (the paper's 1e-3 and more).
    "coef_1e-2": _set(**{"balance.coef": 1e-2}),
    "coef_3e-2": _set(**{"balance.coef": 3e-2}),
    "coef_1e-1": _set(**{"balance.coef": 1e-1}),
    "coef_1e-2_z": _set(**{"balance.coef": 1e-2, "balance.z_loss_coef": 1e-3}),
    # Two experts per token in every layer for the first 10% of the run, then top-1.
    "top2_until_10pct": _early_k(2, 0.1),
    # The Top-1 LBL (Eq. 2) balances the tempered softmax, a differentiable stand-in for f.
    "top1_lbl_tau0.1": _set(**{"balance.loss": "top1_lbl", "model.top1_lbl_tau": 0.1}),
    # Loss-free bias updates act on the counts themselves, which the LBL's shortcut (flat p)
    # leaves alone; here added to the LBL, on softmax scores (about 1/32 = 0.031 each).
    "lbl_and_bias_1e-2": _set(**{"balance.loss_free": True, "balance.bias_rate": 1e-2}),
    "lbl_and_bias_1e-3": _set(**{"balance.loss_free": True, "balance.bias_rate": 1e-3}),
    "lbl_and_bias_3e-4": _set(**{"balance.loss_free": True, "balance.bias_rate": 3e-4}),
    # How fast everything moves.
    "lr_1e-3": _set(**{"train.lr": 1e-3}),
    "init_std_0.05": _set(**{"model.init_std": 0.05}),
    # Blocks read RMS-normalised inputs, so their outputs do not shrink with the embeddings: at
    # std 0.0125 attention's prefix averages (one direction for every token) outweigh the tokens
    # in the residual stream from the first layer on. Larger embeddings keep tokens apart.
    "embed_1.0": _set(**{"model.embed_init_std": 1.0}),
    # Adam moves every router weight by about lr per step whatever the gradient's size: a tenth
    # of it keeps the routers near their initialisation for the first hundred steps.
    "router_lr_0.1": _set(**{"train.router_lr_scale": 0.1}),
    # Room for the most frequent token: "\n" is 11% of the corpus's tokens, 3.5x an expert's
    # fair share, so token-driven routing overflows a capacity factor of 2 by itself.
    "capacity_4": _set(**{"model.capacity_factor": 4.0}),
    "capacity_4_coef_3e-2": _set(**{"model.capacity_factor": 4.0, "balance.coef": 3e-2}),
    "capacity_4_coef_3e-2_embed_1.0": _set(**{"model.capacity_factor": 4.0,
                                              "balance.coef": 3e-2,
                                              "model.embed_init_std": 1.0}),
}

def summarize(metrics_path: str, steps: int, settle: float) -> dict:
  """Per-layer drop and load figures of one run's metrics.jsonl, over the logged steps after
  `settle` * steps."""
  rows = [json.loads(line) for line in storage.read_text(metrics_path).splitlines()]
  logged = [r for r in rows if "drop_fraction" in r and r["step"] > settle * steps]
  drops = np.asarray([r["drop_fraction"] for r in logged])
  max_dev = np.asarray([r["load_max_dev"] for r in logged])
  val = [r for r in rows if "val_loss" in r]
  return {
      "steps_counted": [logged[0]["step"], logged[-1]["step"], len(logged)],
      "drop_mean_per_layer": np.round(drops.mean(0), 4).tolist(),
      "drop_max_per_layer": np.round(drops.max(0), 4).tolist(),
      "worst_layer_drop_mean": round(float(drops.mean(0).max()), 4),
      "load_max_dev_mean_per_layer": np.round(max_dev.mean(0), 3).tolist(),
      "final_val_loss": round(val[-1]["val_loss"], 4) if val else None,
      "final_lm_loss": round(rows[-1].get("lm_loss", float("nan")), 4),
  }


def summarize_rate(metrics_path: str) -> float:
  """Median training tokens per second over the logged steps (the first includes compilation)."""
  rows = [json.loads(line) for line in storage.read_text(metrics_path).splitlines()]
  return round(float(np.median([r["tokens_per_sec"] for r in rows[1:] if "tokens_per_sec" in r])))


def initial_routing(config, batches: int = 4) -> dict:
  """Each layer's most loaded expert (its share times E) at initialisation, over the first
  training batches, and the length of the mean of the router inputs' unit vectors (1: every token
  points the same way, about 0 for unrelated tokens): how unbalanced routing is before any
  training."""
  built = training.build_training(config)
  t = built.settings.train
  graphdef, params = train_lib.init_model(built.settings.model, t.seed)
  model = nnx.merge(graphdef, params)
  pipeline = make_pipeline(built.inputs.train_docs, built.inputs.tokenizer, seq_len=t.seq_len,
                           batch_size=t.batch_size, seed=built.settings.data.seed)
  counts = 0
  for _, batch in zip(range(batches), pipeline):
    _, stats = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    counts = counts + np.asarray(stats.counts.first_choice, np.float64)
  share = counts / counts.sum(-1, keepdims=True) * counts.shape[-1]
  return {"initial_max_share_per_layer": np.round(share.max(-1), 2).tolist(),
          "initial_batches": batches}
