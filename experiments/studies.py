"""The paper's findings as studies at small scale: the runs each study needs and what it measures
from their metrics (see docs/reproduction.md and docs/design.md, "What the paper observed").

A run ("variant") is the base config of experiments/configs/reproduce.py with a few changes; a
study names the variants it compares and turns their metrics.jsonl into results (a JSON-ready
dict) and figures. Variants are shared: the plain-LBL run serves seven studies and is trained once.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import sysconfig
from typing import Callable, Dict, List, NamedTuple

import ml_collections
import numpy as np

from experiments import training
from experiments.settings import model_and_schedule
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.balancing import expert_domain_mutual_information
from sigma_moe_jax.data import load_documents, split_documents
from sigma_moe_jax.params import count_params

# Progressive sparsification: more experts in the two lowest layers (a quarter of 8), as the
# paper's [8,8,6,6,4,4,2,2]+[1]*48 does in its lowest seventh; then top-1 everywhere.
def phase1_top_k(num_layers: int) -> str:
  if num_layers < 3:
    raise ValueError("the progressive study needs model.num_layers >= 3")
  return f"[4,2]+[1]*{num_layers - 2}"


SWITCH_FRACTION = 0.9
DOMAIN_MESH_DATA = 4  # batch shards of the domain study: micro-batch LBL differs from global


# ---------------------------------------------------------------------------------------------
# Variants

def branch_step(config) -> int:
  """The step where progressive sparsification switches to top-1, and the run branches."""
  step = int(round(SWITCH_FRACTION * config.train.steps))
  if step % config.train.checkpoint_every or step <= 0:
    raise ValueError(f"the progressive study branches at step {step} (90% of train.steps="
                     f"{config.train.steps}), which must be a multiple of "
                     f"train.checkpoint_every={config.train.checkpoint_every}")
  if config.train.keep_checkpoints * config.train.checkpoint_every < config.train.steps - step:
    raise ValueError("train.keep_checkpoints is too small to keep the branch checkpoint")
  return step


def python_stdlib_documents(target_chars: int, seed: int) -> List[str]:
  """Source files of the standard library of the Python running this (tests, IDLE and
  site-packages left out), drawn in a seeded order until `target_chars` characters."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                 if not any(part in f for part in ("site-packages", "/test", "idlelib")))
  if not files:
    raise ValueError(f"no Python source files under {root}")
  random.Random(seed).shuffle(files)
  docs, chars = [], 0
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if text.strip():
      docs.append(text)
      chars += len(text)
    if chars >= target_chars:
      break
  return docs


def _write_jsonl(path: str, docs: List[str]):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")


def prepare_domains(config, workdir: str) -> Dict[str, Dict[str, str]]:
  """Two domains, English (the configured corpus) and Python source of equal size, each split
  into train and validation documents: {domain: {"train": path, "val": path}} under workdir."""
  directory = os.path.join(workdir, "data")
  os.makedirs(directory, exist_ok=True)
  english = load_documents(config.data.path)
  python = python_stdlib_documents(sum(map(len, english)), config.data.seed)
  paths = {}
  for name, docs in (("english", english), ("python", python)):
    train, val = split_documents(docs, config.data.val_fraction, config.data.seed)
    paths[name] = {}
    for split, part in (("train", train), ("val", val)):
      path = os.path.join(directory, f"{name}_{split}.jsonl.gz")
      if not os.path.exists(path):
        _write_jsonl(path + ".tmp", part)
        os.replace(path + ".tmp", path)
      paths[name][split] = path
  return paths


def _lbl(c, workdir):
  del c, workdir  # the base config as it is


def _lbl_seed1(c, workdir):
  del workdir
  c.train.seed = 1  # another initialisation, same data order


def _phase1(c, workdir):
  del workdir
  c.schedule.top_k = phase1_top_k(c.model.num_layers)


def _progressive(c, workdir):
  c.schedule.top_k = (f"0:{phase1_top_k(c.model.num_layers)}; "
                     f"{SWITCH_FRACTION}:[1]*{c.model.num_layers}")
  c.train.init_from = os.path.join(workdir, "runs", "phase1")
  c.train.init_step = branch_step(c)


def _loss_free(c, workdir):
  del workdir
  c.model.gate_fn = "sigmoid"
  c.balance.loss = "none"
  c.balance.loss_free = True


def _top1_lbl(c, workdir):
  del workdir
  c.balance.loss = "top1_lbl"
  c.model.top1_lbl_tau = 0.1  # starting temperature, docs/design.md "Top-1 LBL (Eq. 2)"


def _dense(c, workdir):
  del workdir
  c.model.num_experts = 1  # one expert of the same size: the same activated parameters
  c.model.capacity_factor = 1.0
  c.balance.loss = "none"


def _domain_mix(mode):
  def change(c, workdir):
    paths = prepare_domains(c, workdir)
    c.data.path = ",".join(paths[d]["train"] for d in ("english", "python"))
    c.data.val_fraction = 0.0
    c.data.eval_sets = ";".join(f"{d}={paths[d]['val']}" for d in ("english", "python"))
    c.model.lbl_mode = mode
    c.mesh.data = DOMAIN_MESH_DATA
  return change


VARIANTS: Dict[str, Callable] = {
    "lbl": _lbl,
    "lbl_seed1": _lbl_seed1,
    "phase1": _phase1,
    "progressive": _progressive,  # after phase1: it starts from phase1's checkpoint
    "loss_free": _loss_free,
    "top1_lbl": _top1_lbl,
    "dense": _dense,
    "domains_global": _domain_mix("global"),
    "domains_micro_batch": _domain_mix("micro_batch"),
    "domains_sequence": _domain_mix("sequence"),
}


def variant_config(base, name: str, workdir: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(base.to_dict())
  VARIANTS[name](config, workdir)
  return config


# ---------------------------------------------------------------------------------------------
# Reading runs

class Run(NamedTuple):
  """One variant's metrics: `records` by step (a resumed run's later record of a step wins)."""
  name: str
  config: ml_collections.ConfigDict
  records: Dict[int, dict]

  def series(self, key: str):
    """(steps, values) of every record that has `key`, in step order."""
    steps = sorted(s for s, r in self.records.items() if key in r)
    return np.asarray(steps), np.asarray([self.records[s][key] for s in steps], np.float64)

  def last(self, key: str):
    steps, values = self.series(key)
    if not len(steps):
      raise ValueError(f"run {self.name!r} logged no {key!r}")
    return values[-1]

  def model(self) -> ModelConfig:
    return model_and_schedule(self.config)[0]

  def schedule(self):
    return model_and_schedule(self.config)[1]

  def active_params(self, step: int) -> int:
    schedule = self.schedule()
    top_k = None if schedule is None else [int(k) for k in schedule.top_k_at(step)]
    return count_params(self.model(), top_k)["active"]


def read_run(name: str, config, run_dir: str) -> Run:
  records = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      records.setdefault(record["step"], {}).update(record)
  return Run(name, config, records)


def joined(first: Run, second: Run) -> Run:
  """A run started from another's checkpoint (train.init_from), with the other's records up to
  the branch step."""
  branch = second.config.train.init_step
  records = {s: r for s, r in first.records.items() if s <= branch}
  records.update(second.records)
  return Run(second.name, second.config, records)


# ---------------------------------------------------------------------------------------------
# Analyses: each takes {variant: Run} and an output directory and returns (results, figures).

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out: str, name: str) -> str:
  path = os.path.join(out, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _plt().close(fig)
  return path


def _layer_colors(num_layers: int):
  cmap = _plt().get_cmap("viridis")
  return [cmap(i / max(num_layers - 1, 1)) for i in range(num_layers)]


def _lower_vs_upper(values: np.ndarray) -> Dict[str, float]:
  """Mean over the lowest quarter of the layers against the mean over the rest."""
  lower = max(1, len(values) // 4)
  return {"lower_layers_mean": float(np.mean(values[:lower])),
          "upper_layers_mean": float(np.mean(values[lower:]))}


def analyze_imbalance(runs, out):
  """Fig. 2a: per-layer max and min load deviation over training (validation set), top-1."""
  run = runs["lbl"]
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  _, lbl = run.series("val_lbl_per_layer")
  final_max, final_min = max_dev[-1], min_dev[-1]
  late = steps >= steps[-1] / 2  # single evaluations are noisy: also the second half's mean
  results = {
      "final_max_load_dev_per_layer": final_max.tolist(),
      "final_min_load_dev_per_layer": final_min.tolist(),
      "final_lbl_per_layer": lbl[-1].tolist(),
      "second_half_mean_max_load_dev_per_layer": max_dev[late].mean(0).tolist(),
      "second_half_mean_lbl_per_layer": lbl[late].mean(0).tolist(),
      "max_load_dev": _lower_vs_upper(final_max),
      "min_load_dev": _lower_vs_upper(final_min),
      "second_half_max_load_dev": _lower_vs_upper(max_dev[late].mean(0)),
      "second_half_lbl": _lower_vs_upper(lbl[late].mean(0)),
      "most_imbalanced_layer": int(np.argmax(final_max)),
      "drop_fraction_per_layer": run.last("drop_fraction").tolist(),
  }
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for layer, color in enumerate(_layer_colors(max_dev.shape[1])):
    axes[0].plot(steps, 100 * max_dev[:, layer], color=color, label=f"layer {layer}")
    axes[0].plot(steps, 100 * min_dev[:, layer], color=color, linestyle="--")
  axes[0].set(xlabel="step", ylabel="load deviation from uniform (%)",
              title="max (solid) and min (dashed) expert load, top-1 + LBL")
  axes[0].legend(fontsize=7, ncol=2)
  layers = np.arange(len(final_max))
  axes[1].bar(layers, 100 * max_dev[late].mean(0), color="tab:red",
              label="most loaded expert, second-half mean")
  axes[1].bar(layers, 100 * min_dev[late].mean(0), color="tab:blue",
              label="least loaded expert, second-half mean")
  axes[1].scatter(layers, 100 * final_max, color="k", marker="_", s=200, zorder=3,
                  label=f"step {steps[-1]}")
  axes[1].scatter(layers, 100 * final_min, color="k", marker="_", s=200, zorder=3)
  axes[1].set(xlabel="layer", ylabel="load deviation (%)", title="per layer")
  axes[1].set_ylim(top=axes[1].get_ylim()[1] * 1.35)
  axes[1].legend(fontsize=8, loc="upper center")
  return results, [_save(fig, out, "imbalance.png")]


def analyze_shortcut(runs, out):
  """Fig. 2b/c: the spread of p against that of f, in layer 0 and the top layer (the paper's
  layers 0 and 52) and in the least balanced layer. Since sum_i f_i = sum_i p_i = 1,
  LBL = 1 + E * sum_i (f_i - 1/E)(p_i - 1/E): it stays near 1 when either vector is flat or when
  their deviations are uncorrelated, however spiky the other one is."""
  run = runs["lbl"]
  f, p = run.last("val_f"), run.last("val_p")
  load_cv, prob_cv, lbl = run.last("val_load_cv"), run.last("val_gate_prob_cv"), run.last("val_lbl_per_layer")
  num_layers, num_experts = f.shape
  correlation = [float(np.corrcoef(f[l], p[l])[0, 1]) for l in range(num_layers)]
  describe = lambda layer: {
      "layer": layer, "lbl": float(lbl[layer]),
      "f_min": float(f[layer].min()), "f_max": float(f[layer].max()),
      "p_min": float(p[layer].min()), "p_max": float(p[layer].max()),
      "f_cv": float(load_cv[layer]), "p_cv": float(prob_cv[layer]),
      "f_p_correlation": correlation[layer]}
  worst = int(np.argmax(load_cv))
  results = {"uniform_share": 1.0 / num_experts, "layer_0": describe(0),
             "top_layer": describe(num_layers - 1), "least_balanced_layer": describe(worst),
             "per_layer": {"lbl": lbl.tolist(), "f_cv": load_cv.tolist(),
                           "p_cv": prob_cv.tolist(), "f_p_correlation": correlation}}
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, layer in zip(axes, (0, num_layers - 1)):
    order = np.argsort(-f[layer])
    x = np.arange(num_experts)
    ax.bar(x - 0.2, f[layer][order], width=0.4, label="f (share of tokens)")
    ax.bar(x + 0.2, p[layer][order], width=0.4, label="p (mean gate probability)")
    ax.axhline(1.0 / num_experts, color="k", linewidth=0.8, linestyle=":", label="uniform")
    ax.set(xlabel="expert (sorted by f)", title=f"layer {layer}: LBL {lbl[layer]:.3f}, "
           f"CV f {load_cv[layer]:.2f}, CV p {prob_cv[layer]:.2f}")
    ax.legend(fontsize=8)
  return results, [_save(fig, out, "shortcut.png")]


def _final_loss(run: Run) -> float:
  return float(run.last("val_loss"))


def analyze_progressive(runs, out):
  """Progressive sparsification against top-1 from the start, and Table 3: from the phase-1
  checkpoint, keep phase-1 sparsity or convert to top-1."""
  top1, keep = runs["lbl"], runs["phase1"]
  convert = joined(keep, runs["progressive"])
  branch = runs["progressive"].config.train.init_step
  end = top1.config.train.steps
  results = {
      "branch_step": branch,
      "val_loss": {"top1_from_start": _final_loss(top1), "keep_phase1": _final_loss(keep),
                   "converted_to_top1": _final_loss(convert)},
      "val_loss_after_branch": {
          str(step): {"keep_phase1": float(keep.records[step]["val_loss"]),
                      "converted_to_top1": float(convert.records[step]["val_loss"])}
          for step in sorted(convert.records) if step > branch
          and "val_loss" in convert.records[step] and "val_loss" in keep.records.get(step, {})},
      "active_params": {"top1_from_start": top1.active_params(end),
                        "keep_phase1": keep.active_params(end),
                        "converted_to_top1": convert.active_params(end)},
      "final_max_load_dev_per_layer": {
          "top1_from_start": top1.last("val_load_max_dev").tolist(),
          "keep_phase1": keep.last("val_load_max_dev").tolist(),
          "converted_to_top1": convert.last("val_load_max_dev").tolist()},
      "final_min_load_dev_per_layer": {
          "top1_from_start": top1.last("val_load_min_dev").tolist(),
          "keep_phase1": keep.last("val_load_min_dev").tolist(),
          "converted_to_top1": convert.last("val_load_min_dev").tolist()},
  }
  loss = results["val_loss"]
  results["converted_keeps_fraction_of_keep"] = loss["keep_phase1"] / loss["converted_to_top1"]
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  styles = (("top-1 from the start", top1, "tab:gray"), ("phase 1 kept", keep, "tab:blue"),
            ("phase 1, then top-1", convert, "tab:red"))
  for label, run, color in styles:
    axes[0].plot(*run.series("val_loss"), label=label, color=color)
    steps, dev = run.series("val_load_max_dev")
    axes[1].plot(steps, 100 * dev[:, 0], label=f"{label}, layer 0", color=color)
    axes[1].plot(steps, 100 * dev[:, 1], color=color, linestyle="--")
  for ax in axes:
    ax.axvline(branch, color="k", linewidth=0.8, linestyle=":")
  axes[0].set(xlabel="step", ylabel="validation loss", title="validation loss")
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], loss["top1_from_start"] + 1.5))
  axes[1].set(xlabel="step", ylabel="max load deviation (%)",
              title="most loaded expert, layer 0 (solid) and 1 (dashed)")
  axes[0].legend()
  axes[1].legend(fontsize=8)
  return results, [_save(fig, out, "progressive.png")]


def analyze_loss_free(runs, out):
  """Fig. 3: loss-free balancing: bias magnitude per layer and the load of layer 0 over time."""
  free, lbl = runs["loss_free"], runs["lbl"]
  bias_steps, bias = free.series("bias_abs_mean")
  results = {
      "final_bias_abs_mean_per_layer": bias[-1].tolist(),
      "final_max_load_dev_per_layer": {"loss_free": free.last("val_load_max_dev").tolist(),
                                       "lbl": lbl.last("val_load_max_dev").tolist()},
      "final_min_load_dev_per_layer": {"loss_free": free.last("val_load_min_dev").tolist(),
                                       "lbl": lbl.last("val_load_min_dev").tolist()},
      "val_loss": {"loss_free": _final_loss(free), "lbl": _final_loss(lbl)},
  }
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for layer, color in enumerate(_layer_colors(bias.shape[1])):
    axes[0].plot(bias_steps, bias[:, layer], color=color, label=f"layer {layer}")
  axes[0].set(xlabel="step", ylabel="mean |bias|", title="loss-free: selection-bias magnitude")
  axes[0].legend(fontsize=7, ncol=2)
  for label, run, color in (("loss-free", free, "tab:red"), ("LBL", lbl, "tab:gray")):
    steps, max_dev = run.series("val_load_max_dev")
    _, min_dev = run.series("val_load_min_dev")
    axes[1].plot(steps, 100 * max_dev[:, 0], color=color, label=f"{label}: max")
    axes[1].plot(steps, 100 * min_dev[:, 0], color=color, linestyle="--", label=f"{label}: min")
  axes[1].set(xlabel="step", ylabel="load deviation (%)", title="layer 0 expert load")
  axes[1].legend()
  return results, [_save(fig, out, "loss_free.png")]


def analyze_top1_lbl(runs, out):
  """Fig. 4: Top-1 LBL against the standard LBL: per-layer balance and validation loss."""
  top1, lbl = runs["top1_lbl"], runs["lbl"]
  results = {"val_loss": {"top1_lbl": _final_loss(top1), "lbl": _final_loss(lbl)}}
  for key in ("max", "min"):
    values = {name: run.last(f"val_load_{key}_dev") for name, run in (("top1_lbl", top1),
                                                                        ("lbl", lbl))}
    results[f"final_{key}_load_dev_per_layer"] = {k: v.tolist() for k, v in values.items()}
    results[f"{key}_load_dev"] = {k: _lower_vs_upper(v) for k, v in values.items()}
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  layers = np.arange(top1.config.model.num_layers)
  for offset, (label, run, color) in zip((-0.2, 0.2), (("LBL", lbl, "tab:gray"),
                                                       ("Top-1 LBL", top1, "tab:green"))):
    axes[0].bar(layers + offset, 100 * run.last("val_load_max_dev"), width=0.4, color=color,
                label=label)
    axes[0].bar(layers + offset, 100 * run.last("val_load_min_dev"), width=0.4, color=color,
                alpha=0.5)
    axes[1].plot(*run.series("val_loss"), color=color, label=label)
  axes[0].set(xlabel="layer", ylabel="load deviation (%)",
              title="most (up) and least (down) loaded expert at the end")
  axes[1].set(xlabel="step", ylabel="validation loss", title="validation loss")
  axes[1].set_ylim(top=min(axes[1].get_ylim()[1], results["val_loss"]["lbl"] + 1.5))
  axes[0].legend()
  axes[1].legend()
  return results, [_save(fig, out, "top1_lbl.png")]


DOMAIN_MODES = ("global", "micro_batch", "sequence")


def domain_information(run: Run):
  """(steps, [evals, layers] mutual information in bits between expert choice and domain)."""
  steps, english = run.series("english_val_tokens_per_expert")
  _, python = run.series("python_val_tokens_per_expert")
  counts = np.stack([english, python], axis=1)  # [evals, domains, layers, E]
  return steps, np.stack([np.asarray(expert_domain_mutual_information(c)) for c in counts])


def analyze_domains(runs, out):
  """Qiu et al.: global-batch LBL lets experts specialise by domain; micro-batch and
  sequence-level LBL push every shard or sequence towards uniform use."""
  results = {"mutual_information_bits": {}, "val_loss": {}, "max_load_dev_per_layer": {}}
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = dict(zip(DOMAIN_MODES, ("tab:purple", "tab:orange", "tab:cyan")))
  for i, mode in enumerate(DOMAIN_MODES):
    run = runs[f"domains_{mode}"]
    steps, info = domain_information(run)
    results["mutual_information_bits"][mode] = {
        "per_layer": info[-1].tolist(), "mean": float(info[-1].mean())}
    results["val_loss"][mode] = {d: float(run.last(f"{d}_val_loss"))
                                 for d in ("english", "python")}
    results["max_load_dev_per_layer"][mode] = {
        d: run.last(f"{d}_val_load_max_dev").tolist() for d in ("english", "python")}
    layers = np.arange(info.shape[1])
    axes[0].bar(layers + (i - 1) * 0.27, info[-1], width=0.27, color=colors[mode],
                label=f"{mode} LBL")
    axes[1].plot(steps, info.mean(axis=1), color=colors[mode], label=f"{mode} LBL")
  axes[0].set(xlabel="layer", ylabel="I(expert; domain) (bits, max 1)",
              title="expert specialisation at the end")
  axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.25)
  axes[1].set(xlabel="step", ylabel="mean over layers (bits)", title="specialisation over time")
  axes[0].legend(ncol=3, fontsize=8, loc="upper center")
  axes[1].legend()
  return results, [_save(fig, out, "domains.png")]


def analyze_dense(runs, out):
  """MoE against a dense model with the same activated parameters, on the same tokens."""
  moe, dense = runs["lbl"], runs["dense"]
  end = moe.config.train.steps
  results = {
      "val_loss": {"moe": _final_loss(moe), "dense": _final_loss(dense)},
      "active_params": {"moe": moe.active_params(end), "dense": dense.active_params(end)},
      "total_params": {"moe": count_params(moe.model())["total"],
                       "dense": count_params(dense.model())["total"]},
      "tokens": int(end * moe.config.train.batch_size * moe.config.train.seq_len),
  }
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, run, color in (("MoE, 32 experts top-1", moe, "tab:red"),
                            ("dense, same activated params", dense, "tab:gray")):
    ax.plot(*run.series("val_loss"), color=color, label=label)
  ax.set(xlabel="step", ylabel="validation loss", title="MoE against dense")
  ax.set_ylim(top=min(ax.get_ylim()[1], results["val_loss"]["dense"] + 1.5))
  ax.legend()
  return results, [_save(fig, out, "dense.png")]


def analyze_seed_noise(runs, out):
  """How much two initialisations of the same run differ: the yardstick for every comparison."""
  del out
  a, b = runs["lbl"], runs["lbl_seed1"]
  steps, loss_a = a.series("val_loss")
  _, loss_b = b.series("val_loss")
  return {
      "val_loss": {"seed0": _final_loss(a), "seed1": _final_loss(b)},
      "val_loss_abs_diff_final": abs(_final_loss(a) - _final_loss(b)),
      "val_loss_abs_diff_mean_second_half": float(
          np.mean(np.abs(loss_a - loss_b)[steps >= steps[-1] / 2])),
      "final_max_load_dev_per_layer": {"seed0": a.last("val_load_max_dev").tolist(),
                                       "seed1": b.last("val_load_max_dev").tolist()},
      "final_lbl_per_layer": {"seed0": a.last("val_lbl_per_layer").tolist(),
                              "seed1": b.last("val_lbl_per_layer").tolist()},
  }, []


class Study(NamedTuple):
  title: str
  variants: tuple
  analyze: Callable


STUDIES: Dict[str, Study] = {
    "imbalance": Study("Lower-layer imbalance under top-1 (Fig. 2a)", ("lbl",),
                       analyze_imbalance),
    "shortcut": Study("The LBL shortcut (Fig. 2b/c)", ("lbl",), analyze_shortcut),
    "progressive": Study("Progressive sparsification and Table 3",
                         ("lbl", "phase1", "progressive"), analyze_progressive),
    "loss_free": Study("Loss-free balancing (Fig. 3)", ("lbl", "loss_free"), analyze_loss_free),
    "top1_lbl": Study("Top-1 LBL (Fig. 4)", ("lbl", "top1_lbl"), analyze_top1_lbl),
    "domains": Study("Global-batch against micro-batch and sequence LBL (Qiu et al.)",
                     tuple(f"domains_{m}" for m in DOMAIN_MODES), analyze_domains),
    "dense": Study("MoE against dense at equal activated parameters", ("lbl", "dense"),
                   analyze_dense),
    "seed_noise": Study("Seed-to-seed spread of the plain-LBL run", ("lbl", "lbl_seed1"),
                        analyze_seed_noise),
}


# ---------------------------------------------------------------------------------------------
# Running studies (experiments/reproduce.py)

def selected_studies(spec: str):
  names = list(STUDIES) if spec.strip() == "all" else [
      s.strip() for s in spec.split(",") if s.strip()]
  unknown = [n for n in names if n not in STUDIES]
  if unknown or not names:
    raise ValueError(f"unknown --study {unknown or spec!r}; choose from "
                     f"{', '.join(STUDIES)} or all")
  return names


def variant_order(names):
  """Variants of the selected studies, each once, with phase1 before progressive."""
  wanted = {v for n in names for v in STUDIES[n].variants}
  if "progressive" in wanted:
    wanted.add("phase1")
  return [v for v in VARIANTS if v in wanted]


def train_variant(base, name: str, workdir: str):
  """Trains (or resumes, or reuses) one variant; returns its config."""
  config = variant_config(base, name, workdir)
  run_dir = os.path.join(workdir, "runs", name)
  stamp = os.path.join(run_dir, "run_config.json")
  wanted = json.loads(config.to_json())
  if os.path.exists(stamp):
    with open(stamp) as f:
      if json.load(f) != wanted:
        raise ValueError(f"{run_dir} holds a run made with another config; remove it or use "
                         f"another --workdir")
  else:
    os.makedirs(run_dir, exist_ok=True)
    with open(stamp, "w") as f:
      json.dump(wanted, f, indent=1)
  metrics, finished = os.path.join(run_dir, "metrics.jsonl"), False
  if os.path.exists(metrics):
    with open(metrics) as f:
      finished = any(json.loads(line)["step"] == config.train.steps for line in f)
  if not finished:
    print(f"=== training {name} in {run_dir}", flush=True)
    training.run(config, run_dir)
  return config
