"""The studies' figures: each takes {variant: Run}, the study's results and an output directory,
writes PNGs there and returns their paths. matplotlib (Agg) is imported here only, on first use.
"""

from __future__ import annotations

import io

import numpy as np

from experiments.studies import analyses
from experiments.studies.analyses import domain_information
from experiments.studies.runs import joined
from experiments.studies.variants import TRANSITIONS
from sigma_moe_jax.infra import storage


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, out: str, name: str) -> str:
  path = storage.join(out, name)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, dpi=110, format=name.rsplit(".", 1)[-1])
  storage.write_bytes(path, image.getvalue())
  _plt().close(fig)
  return path


def _layer_colors(num_layers: int):
  cmap = _plt().get_cmap("viridis")
  return [cmap(i / max(num_layers - 1, 1)) for i in range(num_layers)]


def imbalance(runs, results, out):
  """Max and min expert load per layer over training, and per layer at the end."""
  del results
  run = runs["lbl"]
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  final_max, final_min = max_dev[-1], min_dev[-1]
  late = steps >= steps[-1] / 2
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
  return [_save(fig, out, "imbalance.png")]


def shortcut(runs, results, out):
  """f against p, experts sorted by f, in layer 0 and the top layer."""
  del results
  run = runs["lbl"]
  f, p = run.last("val_f"), run.last("val_p")
  load_cv, prob_cv = run.last("val_load_cv"), run.last("val_gate_prob_cv")
  lbl = run.last("val_lbl_per_layer")
  num_layers, num_experts = f.shape
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
  return [_save(fig, out, "shortcut.png")]


def progressive(runs, results, out):
  """Validation loss and layers 0-1 max load of the three runs, the branch step marked."""
  top1, keep = runs["lbl"], runs["phase1"]
  convert = joined(keep, runs["progressive"])
  branch = runs["progressive"].config.train.init_step
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
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], results["val_loss"]["top1_from_start"] + 1.5))
  axes[1].set(xlabel="step", ylabel="max load deviation (%)",
              title="most loaded expert, layer 0 (solid) and 1 (dashed)")
  axes[0].legend()
  axes[1].legend(fontsize=8)
  return [_save(fig, out, "progressive.png")]


def loss_free(runs, results, out):
  """Bias spread and magnitude per layer over training, and layer 0's load against the LBL
  run's."""
  del results
  free, lbl = runs["loss_free"], runs["lbl"]
  bias_steps, bias = free.series("bias_abs_mean")
  _, spread = free.series("bias_std")
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for layer, color in enumerate(_layer_colors(bias.shape[1])):
    axes[0].plot(bias_steps, spread[:, layer], color=color, label=f"layer {layer}")
    axes[0].plot(bias_steps, bias[:, layer], color=color, linestyle=":", linewidth=0.8)
  axes[0].set(xlabel="step", ylabel="bias",
              title="loss-free: spread of b over experts (solid), mean |b| (dotted)")
  axes[0].legend(fontsize=7, ncol=2)
  for label, run, color in (("loss-free", free, "tab:red"), ("LBL", lbl, "tab:gray")):
    steps, max_dev = run.series("val_load_max_dev")
    _, min_dev = run.series("val_load_min_dev")
    axes[1].plot(steps, 100 * max_dev[:, 0], color=color, label=f"{label}: max")
    axes[1].plot(steps, 100 * min_dev[:, 0], color=color, linestyle="--", label=f"{label}: min")
  axes[1].set(xlabel="step", ylabel="load deviation (%)", title="layer 0 expert load")
  axes[1].legend()
  return [_save(fig, out, "loss_free.png")]


def loss_free_long(runs, results, out):
  """The long loss-free run: each layer's most and least loaded expert on the validation set over
  training, and the spread of its bias over experts."""
  del results
  run = runs["loss_free"]
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  bias_steps, spread = run.series("bias_std")
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  for layer, color in enumerate(_layer_colors(max_dev.shape[1])):
    axes[0].plot(steps, 100 * max_dev[:, layer], color=color, label=f"layer {layer}")
    axes[1].plot(steps, 100 * min_dev[:, layer], color=color, label=f"layer {layer}")
    axes[2].plot(bias_steps, spread[:, layer], color=color, label=f"layer {layer}")
  axes[0].set(xlabel="step", ylabel="most loaded expert (% above its share)", yscale="log",
              title="loss-free: most loaded expert (validation)")
  axes[1].set(xlabel="step", ylabel="least loaded expert (%)",
              title="least loaded expert (−100%: no token)")
  axes[2].set(xlabel="step", ylabel="spread of b over experts", title="bias spread")
  axes[0].legend(fontsize=7, ncol=2)
  return [_save(fig, out, "loss_free_long.png")]


def top1_lbl(runs, results, out):
  """Max and min load per layer at the end; the lowest quarter's most loaded expert over
  training against the plain LBL's seeds (band); validation loss."""
  top1, lbl = runs["top1_lbl"], runs["lbl"]
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  layers = np.arange(top1.config.model.num_layers)
  for offset, (label, run, color) in zip((-0.2, 0.2), (("LBL", lbl, "tab:gray"),
                                                       ("Top-1 LBL", top1, "tab:green"))):
    axes[0].bar(layers + offset, 100 * run.last("val_load_max_dev"), width=0.4, color=color,
                label=label)
    axes[0].bar(layers + offset, 100 * run.last("val_load_min_dev"), width=0.4, color=color,
                alpha=0.5)
    axes[2].plot(*run.series("val_loss"), color=color, label=label)
  curve = results["over_training"]
  steps = np.asarray(curve["steps"])
  band = [100 * np.asarray(curve[f"lbl_lower_layers_max_load_dev_{end}_over_seeds"])
          for end in ("min", "max")]
  axes[1].fill_between(steps, *band, color="tab:gray", alpha=0.4, label="LBL, 3 seeds")
  axes[1].plot(steps, 100 * np.asarray(curve["top1_lbl_lower_layers_max_load_dev"]),
               color="tab:green", label="Top-1 LBL")
  axes[0].set(xlabel="layer", ylabel="load deviation (%)",
              title="most (up) and least (down) loaded expert at the end")
  axes[1].set(xlabel="step", ylabel="max load deviation (%)",
              title="layers 0-1, most loaded expert (mean)")
  axes[2].set(xlabel="step", ylabel="validation loss", title="validation loss")
  axes[2].set_ylim(top=min(axes[2].get_ylim()[1], results["val_loss"]["lbl"] + 1.5))
  for ax in axes:
    ax.legend(fontsize=8)
  return [_save(fig, out, "top1_lbl.png")]


def depth(runs, results, out):
  """The 16-layer run: per-layer most / least loaded expert (second-half mean) and CV of f
  against CV of p at the end."""
  run = runs["deep"]
  layers = np.arange(results["num_layers"])
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  axes[0].bar(layers, 100 * np.asarray(results["max_load_dev_per_layer"]), color="tab:red",
              label="most loaded expert")
  axes[0].bar(layers, 100 * np.asarray(results["min_load_dev_per_layer"]), color="tab:blue",
              label="least loaded expert")
  axes[0].set(xlabel="layer", ylabel="load deviation (%)",
              title="16 layers, top-1 + LBL, second-half mean")
  axes[1].plot(layers, run.last("val_load_cv"), marker="o", label="CV of f (load)")
  axes[1].plot(layers, run.last("val_gate_prob_cv"), marker="o", label="CV of p (probability)")
  axes[1].set(xlabel="layer", ylabel="coefficient of variation over experts",
              title="spikiness of f and p at the end")
  for ax in axes:
    ax.legend(fontsize=8)
  return [_save(fig, out, "depth.png")]


def depth_profile(runs, results, out):
  """The 16-layer seeds: each seed's second-half most loaded expert per layer and their mean,
  with the lowest quarter shaded."""
  del runs
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.arange(results["num_layers"])
  ax.axvspan(-0.5, results["num_layers"] // 4 - 0.5, color="tab:gray", alpha=0.15,
             label="lowest quarter")
  for name, seed in results["seeds"].items():
    ax.plot(layers, 100 * np.asarray(seed["max_load_dev_per_layer"]), marker=".", alpha=0.6,
            label=name)
  ax.plot(layers, 100 * np.asarray(results["max_load_dev_per_layer_mean"]), color="k",
          linewidth=2, label="mean over seeds")
  ax.set(xlabel="layer", ylabel="most loaded expert, deviation (%)",
         title=f"{results['num_layers']} layers, top-1 + LBL, second-half mean")
  ax.legend(fontsize=8)
  return [_save(fig, out, "depth_profile.png")]


def transition(runs, results, out):
  """Per switch point: training loss minus phase 1 kept's on the same batches (mean over seeds,
  10-step mean), abrupt against gradual; and layer 0's most loaded expert per step."""
  del results
  plt = _plt()
  fig, axes = plt.subplots(1, 4, figsize=(20, 4))
  colors = {False: "tab:red", True: "tab:blue"}
  for name, (gradual, fraction) in TRANSITIONS.items():
    ax = axes[[0.5, 0.7, 0.9].index(fraction)]
    deltas, loads = [], []
    for seed_name, run in analyses.by_seed(runs, name).items():
      keep = runs["phase1" + ("" if seed_name == "seed0" else "_" + seed_name)]
      steps, loss = run.series("lm_loss")
      keep_steps, keep_loss = keep.series("lm_loss")
      deltas.append(loss - keep_loss[np.isin(keep_steps, steps)])
      loads.append(run.series("load_max_dev")[1][:, 0])
    label = "gradual" if gradual else "abrupt"
    delta = np.convolve(np.mean(deltas, 0), np.ones(10) / 10, mode="valid")
    ax.plot(steps[9:], delta, color=colors[gradual], label=label)
    ax.axvline(fraction * run.config.train.steps, color="k", linewidth=0.8, linestyle=":")
    ax.axhline(0, color="tab:gray", linewidth=0.8)
    ax.set(xlabel="step", ylabel="training loss − phase 1 kept",
           title=f"switch at {fraction:.0%}")
    ax.legend(fontsize=8)
    load = np.convolve(np.mean(loads, 0), np.ones(10) / 10, mode="valid")
    axes[3].plot(steps[9:], 100 * load, color=colors[gradual],
                 linestyle={0.5: "-", 0.7: "--", 0.9: ":"}[fraction],
                 label=f"{label} at {fraction:.0%}")
  axes[3].set(xlabel="step", ylabel="max load deviation (%)",
              title="layer 0, most loaded expert (training batches)")
  axes[3].legend(fontsize=7)
  return [_save(fig, out, "transition.png")]


def domains(runs, results, out, name="domains.png"):
  """Expert-domain mutual information per layer at the end, and its mean over training."""
  del results
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"global": "tab:purple", "micro_batch": "tab:orange", "sequence": "tab:cyan"}
  width = 0.8 / len(runs)
  for i, (variant, run) in enumerate(runs.items()):
    mode = variant.replace("domains_by_shard_", "").replace("domains_", "")
    steps, info = domain_information(run)
    layers = np.arange(info.shape[1])
    axes[0].bar(layers + (i - (len(runs) - 1) / 2) * width, info[-1], width=width,
                color=colors[mode], label=f"{mode} LBL")
    axes[1].plot(steps, info.mean(axis=1), color=colors[mode], label=f"{mode} LBL")
  axes[0].set(xlabel="layer", ylabel="I(expert; domain) (bits, max 1)",
              title="expert specialisation at the end")
  axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.25)
  axes[1].set(xlabel="step", ylabel="mean over layers (bits)", title="specialisation over time")
  axes[0].legend(ncol=3, fontsize=8, loc="upper center")
  axes[1].legend()
  return [_save(fig, out, name)]


def domains_by_shard(runs, results, out):
  """As `domains`, for the runs whose batch shards each read one domain."""
  return domains(runs, results, out, name="domains_by_shard.png")


def dense(runs, results, out):
  """Validation loss of the MoE and the dense model."""
  moe, dense_run = runs["lbl"], runs["dense"]
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, run, color in (("MoE, 32 experts top-1", moe, "tab:red"),
                            ("dense, same activated params", dense_run, "tab:gray")):
    ax.plot(*run.series("val_loss"), color=color, label=label)
  ax.set(xlabel="step", ylabel="validation loss", title="MoE against dense")
  ax.set_ylim(top=min(ax.get_ylim()[1], results["val_loss"]["dense"] + 1.5))
  ax.legend()
  return [_save(fig, out, "dense.png")]


def adaptive(runs, results, out):
  """Validation loss over training (mean over seeds, band min-max); per-step training loss
  minus top-1's around the switch (mean over seeds, smoothed); the adaptive run's k per layer."""
  groups = {g: analyses.seeded(runs, kind) for g, kind in results["groups"].items()}
  switch = results["switch_step"]
  colors = {"top1_from_start": "tab:gray", "manual": "tab:blue", "ramp": "tab:green",
            "adaptive": "tab:red"}
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  for g, rs in groups.items():
    steps, _ = rs[0].series("val_loss")
    losses = np.stack([r.series("val_loss")[1] for r in rs])
    axes[0].plot(steps, losses.mean(0), color=colors[g], label=g.replace("_", " "))
    axes[0].fill_between(steps, losses.min(0), losses.max(0), color=colors[g], alpha=0.2)
    if g == "top1_from_start":
      continue
    deltas = []
    for run, ref in zip(rs, groups["top1_from_start"]):
      s, a = run.series("lm_loss")
      _, b = ref.series("lm_loss")
      deltas.append(a - b)
    delta = np.convolve(np.mean(deltas, 0), np.ones(5) / 5, mode="same")
    keep = s >= switch - 100
    axes[1].plot(s[keep], delta[keep], color=colors[g], label=g)
  axes[0].set_ylim(top=min(axes[0].get_ylim()[1], results["final_val_loss"]["manual"]["mean"] + 1))
  axes[0].set(xlabel="step", ylabel="validation loss", title="validation loss (band: seeds)")
  axes[1].axhline(0, color="tab:gray", linewidth=0.8)
  axes[1].set(xlabel="step", ylabel="training loss − top-1's, same batch",
              title="around the switch (mean of seeds, 5-step mean)")
  for ax in axes[:2]:
    ax.axvline(switch, color="k", linewidth=0.8, linestyle=":")
    ax.legend(fontsize=8)
  steps, top_k = groups["adaptive"][0].series("top_k")
  manual_steps, manual_k = groups["manual"][0].series("top_k")
  for layer, color in enumerate(_layer_colors(top_k.shape[1])):
    if manual_k[:, layer].max() > 1 or top_k[:, layer].max() > 1:
      axes[2].plot(steps, top_k[:, layer], color=color, label=f"adaptive, layer {layer}")
      axes[2].plot(manual_steps, manual_k[:, layer], color=color, linestyle=":",
                   label=f"manual, layer {layer}")
  axes[2].set(xlabel="step", ylabel="experts per token", title="top-k per layer (seed 0)")
  axes[2].legend(fontsize=8)
  return [_save(fig, out, "adaptive.png")]
