"""Balance studies: the imbalance across layers (Fig. 2a), the LBL shortcut (Fig. 2b/c), depth,
loss-free balancing, the Top-1 LBL, domain specialisation and the dense baseline."""

from __future__ import annotations

import numpy as np

from experiments.studies.analyses.common import (band, by_seed, final_loss, lower_vs_upper,
                                                 paired_summary, paired_with_lbl,
                                                 second_half_balance, series_window,
                                                 domain_information)
from experiments.studies.runs import Run
from experiments.studies.variants import split_seed
from sigma_moe_jax.params import count_params


def imbalance(runs):
  """Fig. 2a: per-layer max and min load deviation over training (validation set), top-1."""
  run = runs["lbl"]
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  _, lbl = run.series("val_lbl_per_layer")
  final_max, final_min = max_dev[-1], min_dev[-1]
  late = steps >= steps[-1] / 2  # single evaluations are noisy: also the second half's mean
  return {
      "final_max_load_dev_per_layer": final_max.tolist(),
      "final_min_load_dev_per_layer": final_min.tolist(),
      "final_lbl_per_layer": lbl[-1].tolist(),
      "second_half_mean_max_load_dev_per_layer": max_dev[late].mean(0).tolist(),
      "second_half_mean_lbl_per_layer": lbl[late].mean(0).tolist(),
      "max_load_dev": lower_vs_upper(final_max),
      "min_load_dev": lower_vs_upper(final_min),
      "second_half_max_load_dev": lower_vs_upper(max_dev[late].mean(0)),
      "second_half_lbl": lower_vs_upper(lbl[late].mean(0)),
      "most_imbalanced_layer": int(np.argmax(final_max)),
      "drop_fraction_per_layer": run.last("drop_fraction").tolist(),
      "seeds": {name: second_half_balance(r) for name, r in by_seed(runs, "lbl").items()},
      "most_imbalanced_layer_by_window": {
          name: _most_imbalanced_by_window(r) for name, r in by_seed(runs, "lbl").items()},
      "no_lbl": {**second_half_balance(runs["no_lbl"]),
                 "final_val_loss": final_loss(runs["no_lbl"])},
  }


def _most_imbalanced_by_window(run: Run) -> dict:
  """The layer whose most loaded expert (validation) is highest, averaged over different spans
  of the evaluations: which layer is "the most imbalanced" depends on the span."""
  steps, max_dev = run.series("val_load_max_dev")
  end = run.config.train.steps
  spans = {"last_evaluation": steps == steps[-1], "last_quarter": steps > 0.75 * end,
           "second_half": steps >= steps[-1] / 2, "after_10pct": steps > 0.1 * end,
           "first_half": steps < end / 2}
  return {name: int(np.argmax(max_dev[keep].mean(0))) for name, keep in spans.items()}


def shortcut(runs):
  """Fig. 2b/c: the spread of p against that of f, in layer 0 and the top layer (the paper's
  layers 0 and 52) and in the least balanced layer. Since sum_i f_i = sum_i p_i = 1,
  LBL = 1 + E * sum_i (f_i - 1/E)(p_i - 1/E): it stays near 1 when either vector is flat or when
  their deviations are uncorrelated, however spiky the other one is."""
  run = runs["lbl"]
  f, p = run.last("val_f"), run.last("val_p")
  load_cv, prob_cv = run.last("val_load_cv"), run.last("val_gate_prob_cv")
  lbl = run.last("val_lbl_per_layer")
  num_layers, num_experts = f.shape
  correlation = [float(np.corrcoef(f[l], p[l])[0, 1]) for l in range(num_layers)]
  describe = lambda layer: {
      "layer": layer, "lbl": float(lbl[layer]),
      "f_min": float(f[layer].min()), "f_max": float(f[layer].max()),
      "p_min": float(p[layer].min()), "p_max": float(p[layer].max()),
      "f_cv": float(load_cv[layer]), "p_cv": float(prob_cv[layer]),
      "f_p_correlation": correlation[layer]}
  worst = int(np.argmax(load_cv))
  return {"uniform_share": 1.0 / num_experts, "layer_0": describe(0),
          "top_layer": describe(num_layers - 1), "least_balanced_layer": describe(worst),
          "per_layer": {"lbl": lbl.tolist(), "f_cv": load_cv.tolist(),
                        "p_cv": prob_cv.tolist(), "f_p_correlation": correlation},
          "seeds": {name: _spread(r) for name, r in by_seed(runs, "lbl").items()}}


def _spread(run: Run) -> dict:
  """Per layer at the last evaluation: CV(f) / CV(p) (how much spikier the load is than the
  probabilities), corr(f, p), and the LBL."""
  f, p = run.last("val_f"), run.last("val_p")
  load_cv, prob_cv = run.last("val_load_cv"), run.last("val_gate_prob_cv")
  return {"f_cv_over_p_cv": (load_cv / prob_cv).tolist(),
          "f_p_correlation": [float(np.corrcoef(f[l], p[l])[0, 1]) for l in range(len(f))],
          "lbl": run.last("val_lbl_per_layer").tolist()}


def depth(runs):
  """Fig. 2a/2c with 16 layers: the lowest quarter against the rest, and whether the upper
  layers show a flat f with a spiky p (the paper's layer 52)."""
  run = runs["deep"]
  return {"num_layers": int(run.model().num_layers), **second_half_balance(run),
          **_spread(run), "f_cv": run.last("val_load_cv").tolist(),
          "p_cv": run.last("val_gate_prob_cv").tolist(), "final_val_loss": final_loss(run)}


def depth_profile(runs):
  """The lower-layer claim (Fig. 2a) over 16 layers and several seeds, with its statistics fixed
  before the runs were trained. Per seed, from the second half's mean of the most loaded expert
  per layer (validation): `lower_minus_rest`, the lowest quarter's mean (layers 0-3) minus the
  other layers' mean, and `slope_per_layer`, the least-squares slope of that profile over the
  layer index. Over the seeds each is a band, and `with_intervals` gives its paired t interval.
  The claim is read as reproduced at this scale if the interval of `lower_minus_rest` lies above
  zero and that of the slope below it; as contradicted if either lies wholly on the other side;
  otherwise the test cannot tell. The load CV gets the same two statistics; the empty experts,
  the drops and the spikiness of f against p (Fig. 2c) are reported per layer, without a verdict
  rule."""
  per_seed = {}
  for name, run in by_seed(runs, "deep").items():
    balance = second_half_balance(run)
    profile = np.asarray(balance["max_load_dev_per_layer"])
    cv = np.asarray(balance["load_cv_per_layer"])
    per_seed[name] = {
        "max_load_dev_per_layer": profile.tolist(), **_over_depth(profile),
        "load_cv_per_layer": cv.tolist(), **_over_depth(cv, "load_cv_"),
        "empty_experts_final_per_layer": balance["empty_experts_final_per_layer"],
        "train_drop_fraction_per_layer": balance["train_drop_fraction_per_layer"],
        **_spread(run), "final_val_loss": final_loss(run)}
  seeds = list(per_seed.values())
  over = lambda key: band([s[key] for s in seeds])
  return {"num_layers": len(seeds[0]["max_load_dev_per_layer"]), "seeds": per_seed,
          "over_seeds": {key: over(key) for key in (
              "lower_minus_rest", "slope_per_layer", "load_cv_lower_minus_rest",
              "load_cv_slope_per_layer", "final_val_loss")},
          "max_load_dev_per_layer_mean": np.mean(
              [s["max_load_dev_per_layer"] for s in seeds], 0).tolist(),
          "most_imbalanced_layer": {n: int(np.argmax(s["max_load_dev_per_layer"]))
                                    for n, s in per_seed.items()}}


def _over_depth(values: np.ndarray, prefix: str = "") -> dict:
  """A per-layer profile's lowest quarter minus the rest, and its least-squares slope."""
  split = lower_vs_upper(values)
  return {prefix + "lower_minus_rest": split["lower_layers_mean"] - split["upper_layers_mean"],
          prefix + "slope_per_layer": float(np.polyfit(np.arange(len(values)), values, 1)[0])}


def loss_free(runs):
  """Fig. 3: loss-free balancing: bias magnitude per layer and the load against the LBL's (seed
  0 in the top-level fields; every seed, paired with the LBL run of the same seed, in
  `seeds`)."""
  free, lbl = runs["loss_free"], runs["lbl"]
  _, bias = free.series("bias_abs_mean")
  _, spread = free.series("bias_std")
  seeds = paired_with_lbl(runs, "loss_free")
  for name, run in by_seed(runs, "loss_free").items():
    seeds[name]["final_bias_abs_mean_per_layer"] = run.last("bias_abs_mean").tolist()
    seeds[name]["final_bias_std_per_layer"] = run.last("bias_std").tolist()
  return {
      "final_bias_abs_mean_per_layer": bias[-1].tolist(),
      # The spread of b across experts: the part of the bias that changes which expert wins.
      "final_bias_std_per_layer": spread[-1].tolist(),
      "second_half": {"loss_free": second_half_balance(free),
                      "lbl": second_half_balance(lbl)},
      "final_max_load_dev_per_layer": {"loss_free": free.last("val_load_max_dev").tolist(),
                                       "lbl": lbl.last("val_load_max_dev").tolist()},
      "final_min_load_dev_per_layer": {"loss_free": free.last("val_load_min_dev").tolist(),
                                       "lbl": lbl.last("val_load_min_dev").tolist()},
      "val_loss": {"loss_free": final_loss(free), "lbl": final_loss(lbl)},
      "seeds": seeds, "over_seeds": paired_summary(seeds),
  }


def loss_free_long(runs):
  """The loss-free run trained long enough for the paper's late collapse (Fig. 3: after about
  2K steps layer 0's least loaded expert gets nothing and the most loaded up to about 40x its
  share), layer by layer over training, in windows of a tenth of the run."""
  run = runs["loss_free"]
  end = run.config.train.steps
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  tenths = []
  for i in range(10):
    lo, hi = i * end // 10, (i + 1) * end // 10
    train_max = series_window(run, "load_max_dev", lo, hi)
    tenths.append({"steps": [lo + 1, hi],
                   "train_max_load_dev_per_layer": train_max.mean(0).tolist(),
                   "train_drop_fraction_per_layer":
                       series_window(run, "drop_fraction", lo, hi).mean(0).tolist(),
                   "bias_abs_mean_per_layer":
                       series_window(run, "bias_abs_mean", lo, hi)[-1].tolist(),
                   "bias_std_per_layer": series_window(run, "bias_std", lo, hi)[-1].tolist()})
  return {"steps": int(end), "val_steps": steps.tolist(),
          "val_max_load_dev_per_layer": max_dev.tolist(),
          "val_min_load_dev_per_layer": min_dev.tolist(),
          "val_loss": run.series("val_loss")[1].tolist(),
          # evaluations at which a layer's least loaded expert got no token at all
          "evaluations_with_an_empty_expert_per_layer": np.sum(min_dev <= -1.0, 0).tolist(),
          "tenths": tenths}


def top1_lbl(runs):
  """Fig. 4: Top-1 LBL against the standard LBL: per-layer balance and validation loss."""
  top1, lbl = runs["top1_lbl"], runs["lbl"]
  results = {"val_loss": {"top1_lbl": final_loss(top1), "lbl": final_loss(lbl)}}
  for key in ("max", "min"):
    values = {name: run.last(f"val_load_{key}_dev") for name, run in (("top1_lbl", top1),
                                                                        ("lbl", lbl))}
    results[f"final_{key}_load_dev_per_layer"] = {k: v.tolist() for k, v in values.items()}
    results[f"{key}_load_dev"] = {k: lower_vs_upper(v) for k, v in values.items()}
  # Over training (the paper's Fig. 4 is a curve): the lowest quarter's most loaded expert at
  # each evaluation, Top-1 LBL against every seed of the plain LBL.
  steps, top1_dev = top1.series("val_load_max_dev")
  lower = max(1, top1_dev.shape[1] // 4)
  lbl_seeds = by_seed(runs, "lbl")
  lbl_dev = np.stack([r.series("val_load_max_dev")[1][:, :lower].mean(1)
                      for r in lbl_seeds.values()])
  top1_lower = top1_dev[:, :lower].mean(1)
  results["over_training"] = {
      "steps": steps.tolist(), "top1_lbl_lower_layers_max_load_dev": top1_lower.tolist(),
      "lbl_lower_layers_max_load_dev_min_over_seeds": lbl_dev.min(0).tolist(),
      "lbl_lower_layers_max_load_dev_max_over_seeds": lbl_dev.max(0).tolist(),
      "evaluations_below_every_lbl_seed": int(np.sum(top1_lower < lbl_dev.min(0))),
      "evaluations": int(len(steps))}
  # The sweep: temperature and coefficient, each against the plain LBL's seeds.
  results["sweep"] = {
      name: {"tau": float(r.config.model.top1_lbl_tau), "coef": float(r.config.balance.coef),
             "final_val_loss": final_loss(r), **second_half_balance(r),
             "final_min_load_dev_per_layer": r.last("val_load_min_dev").tolist()}
      for name, r in runs.items() if split_seed(name)[0].startswith("top1_lbl")
      and not split_seed(name)[1]}
  results["seeds"] = paired_with_lbl(runs, "top1_lbl")
  results["over_seeds"] = paired_summary(results["seeds"])
  # Experts that get no validation token at the last evaluation, per layer: the balance that a
  # most-loaded-expert figure does not show.
  empty = lambda run: (np.asarray(run.last("val_tokens_per_expert")) == 0).sum(-1).tolist()
  for name, run in by_seed(runs, "top1_lbl").items():
    results["seeds"][name]["empty_experts_final_per_layer"] = empty(run)
    results["seeds"][name]["lbl_empty_experts_final_per_layer"] = empty(lbl_seeds[name])
  lower_of = lambda v, key: float(np.mean(v[key][:lower]))
  results["over_seeds"]["second_half_lower_layers_max_load_dev"] = {
      n: {"top1_lbl": lower_of(v, "second_half_max_load_dev_per_layer"),
          "lbl": lower_of(v, "lbl_second_half_max_load_dev_per_layer")}
      for n, v in results["seeds"].items()}
  results["lbl_seeds"] = {
      "final_val_loss": band([final_loss(r) for r in lbl_seeds.values()]),
      "second_half_lower_layers_max_load_dev": band(
          [second_half_balance(r)["max_load_dev"]["lower_layers_mean"]
           for r in lbl_seeds.values()])}
  return results


def domains(runs):
  """Qiu et al.: global-batch LBL lets experts specialise by domain; micro-batch and
  sequence-level LBL push every shard or sequence towards uniform use. One entry per balancing
  mode of the runs given ("domains_<mode>" or "domains_by_shard_<mode>")."""
  results = {"mutual_information_bits": {}, "val_loss": {}, "max_load_dev_per_layer": {}}
  for name, run in runs.items():
    mode = name.replace("domains_by_shard_", "").replace("domains_", "")
    _, info = domain_information(run)
    late = info[len(info) // 2:].mean(1)  # layer means of the second half's evaluations
    results["mutual_information_bits"][mode] = {
        "per_layer": info[-1].tolist(), "mean": float(info[-1].mean()),
        # How much the layer mean moves between evaluations late in one run: a within-run
        # band (one seed per mode), not a seed-to-seed one.
        "second_half": {"mean": float(late.mean()), "min": float(late.min()),
                        "max": float(late.max())}}
    results["val_loss"][mode] = {d: float(run.last(f"{d}_val_loss"))
                                 for d in ("english", "python")}
    results["max_load_dev_per_layer"][mode] = {
        d: run.last(f"{d}_val_load_max_dev").tolist() for d in ("english", "python")}
  return results


def dense(runs):
  """MoE against a dense model with the same activated parameters, on the same tokens."""
  moe, dense_run = runs["lbl"], runs["dense"]
  end = moe.config.train.steps
  return {
      "val_loss": {"moe": final_loss(moe), "dense": final_loss(dense_run)},
      "active_params": {"moe": moe.active_params(end), "dense": dense_run.active_params(end)},
      "total_params": {"moe": count_params(moe.model())["total"],
                       "dense": count_params(dense_run.model())["total"]},
      "tokens": int(end * moe.config.train.batch_size * moe.config.train.seq_len),
  }


def no_newline(runs):
  """The LBL run against the same run on the corpus without line breaks (no end-of-line token):
  each one's second-half balance, and the change per layer. If the lower layers' imbalance were
  the end-of-line token routed by identity, it would fall towards the rest's without it.
  Validation losses are not comparable (the tokens differ)."""
  with_eol, without = (second_half_balance(runs[k]) for k in ("lbl", "no_newline"))
  keys = ("max_load_dev_per_layer", "load_cv_per_layer", "empty_experts_final_per_layer")
  return {
      "lbl": {k: with_eol[k] for k in keys + ("max_load_dev", "train_drop_fraction_per_layer")},
      "no_newline": {k: without[k] for k in keys + ("max_load_dev",
                                                    "train_drop_fraction_per_layer")},
      "max_load_dev_change_per_layer": (np.asarray(without["max_load_dev_per_layer"])
                                        - np.asarray(with_eol["max_load_dev_per_layer"])).tolist(),
      "drop_fraction_first_10pct_per_layer": {
          k: series_window(runs[k], "drop_fraction", 0, runs[k].config.train.steps // 10
                           ).mean(0).tolist() for k in ("lbl", "no_newline")},
  }
