"""What each study measures, in numbers only: each analysis takes {variant: Run} and returns its
results (a JSON-ready dict). NumPy only; the figures are in figures.py.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from experiments.studies.runs import Run, joined
from experiments.studies.variants import (ADAPTIVE_CALM_FRACTION, ADAPTIVE_WINDOW, SWITCH_FRACTION,
                                          TRANSITIONS, split_seed)
from sigma_moe_jax.balancing import expert_domain_mutual_information
from sigma_moe_jax.params import count_params


def _lower_vs_upper(values: np.ndarray) -> Dict[str, float]:
  """Mean over the lowest quarter of the layers against the mean over the rest."""
  lower = max(1, len(values) // 4)
  return {"lower_layers_mean": float(np.mean(values[:lower])),
          "upper_layers_mean": float(np.mean(values[lower:]))}


def _final_loss(run: Run) -> float:
  return float(run.last("val_loss"))


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
      "max_load_dev": _lower_vs_upper(final_max),
      "min_load_dev": _lower_vs_upper(final_min),
      "second_half_max_load_dev": _lower_vs_upper(max_dev[late].mean(0)),
      "second_half_lbl": _lower_vs_upper(lbl[late].mean(0)),
      "most_imbalanced_layer": int(np.argmax(final_max)),
      "drop_fraction_per_layer": run.last("drop_fraction").tolist(),
      "seeds": {name: _second_half_balance(r) for name, r in _by_seed(runs, "lbl").items()},
      "most_imbalanced_layer_by_window": {
          name: _most_imbalanced_by_window(r) for name, r in _by_seed(runs, "lbl").items()},
      "no_lbl": {**_second_half_balance(runs["no_lbl"]),
                 "final_val_loss": _final_loss(runs["no_lbl"])},
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


def _by_seed(runs, kind: str) -> Dict[str, Run]:
  """{"seed0": runs[kind], "seed1": runs[kind + "_seed1"], ...} for the seeds present."""
  return {f"seed{split_seed(n)[1]}": r for n, r in sorted(
      runs.items(), key=lambda item: split_seed(item[0])[1]) if split_seed(n)[0] == kind}


def _second_half_balance(run: Run) -> dict:
  """A run's balance on the validation set averaged over the second half of training (single
  evaluations are noisy), and its training drops after the first 10% of the steps."""
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  _, lbl = run.series("val_lbl_per_layer")
  late = steps >= steps[-1] / 2
  end = run.config.train.steps
  return {"max_load_dev_per_layer": max_dev[late].mean(0).tolist(),
          "min_load_dev_per_layer": min_dev[late].mean(0).tolist(),
          "lbl_per_layer": lbl[late].mean(0).tolist(),
          "max_load_dev": _lower_vs_upper(max_dev[late].mean(0)),
          "lbl": _lower_vs_upper(lbl[late].mean(0)),
          "most_imbalanced_layer": int(np.argmax(max_dev[late].mean(0))),
          "train_drop_fraction_per_layer": _window(run, "drop_fraction", end // 10,
                                                   end).mean(0).tolist()}


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
          "seeds": {name: _spread(r) for name, r in _by_seed(runs, "lbl").items()}}


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
  return {"num_layers": int(run.model().num_layers), **_second_half_balance(run),
          **_spread(run), "f_cv": run.last("val_load_cv").tolist(),
          "p_cv": run.last("val_gate_prob_cv").tolist(), "final_val_loss": _final_loss(run)}


# Steps after a switch over which its jump in training loss is measured.
SWITCH_STEPS = 20

def progressive(runs):
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
  groups = {"top1_from_start": _seeded(runs, "lbl"), "keep_phase1": _seeded(runs, "phase1"),
            "converted_to_top1": _seeded(runs, "progressive")}
  final = {g: [_final_loss(r) for r in rs] for g, rs in groups.items()}
  results["seeds"] = {
      "final_val_loss": {g: _band(v) for g, v in final.items()},
      "converted_minus_keep": _band(np.subtract(final["converted_to_top1"],
                                                final["keep_phase1"])),
      "converted_minus_top1": _band(np.subtract(final["converted_to_top1"],
                                                final["top1_from_start"])),
      "keep_minus_top1": _band(np.subtract(final["keep_phase1"], final["top1_from_start"])),
      # Table 3's question as a share: how much of phase 1's gain over top-1 from the start the
      # conversion keeps, (top-1 - converted) / (top-1 - kept); None at a seed where phase 1
      # has no gain to keep.
      "converted_share_of_phase1_gain": [
          (t - c) / (t - k) if t - k > 0 else None for t, k, c in zip(
              final["top1_from_start"], final["keep_phase1"], final["converted_to_top1"])],
      "second_half_max_load_dev_lower_layers": {
          g: _band([_second_half_balance(r)["max_load_dev"]["lower_layers_mean"] for r in rs])
          for g, rs in groups.items()},
  }
  # Drops confound quality: the worst layer's share of training assignments dropped after the
  # first 10% of the steps (the converted runs joined to their phase-1 runs before the branch).
  converted = groups["converted_to_top1"]
  results["seeds"]["train_drop_fraction_after_10pct_worst_layer"] = {
      g: _band([float(_window(r, "drop_fraction", end // 10, end).mean(0).max()) for r in rs])
      for g, rs in groups.items()}
  # The switch: training loss of the converted run minus phase 1 kept, on the same batches, over
  # the SWITCH_STEPS steps after the branch.
  results["seeds"]["switch_jump_lm_loss"] = _band([
      float(np.mean(_window(c, "lm_loss", branch, branch + SWITCH_STEPS)
                    - _window(k, "lm_loss", branch, branch + SWITCH_STEPS)))
      for k, c in zip(groups["keep_phase1"], converted)])
  # Layer 0 after the switch, when every layer runs top-1: its most loaded expert on the
  # training batches, mean over the steps after the branch, against top-1 from the start on the
  # same batches (before the switch layer 0 of the converted run still routes to 4 experts).
  after = {g: [float(_window(r, "load_max_dev", branch, end)[:, 0].mean()) for r in rs]
           for g, rs in (("converted_to_top1", converted),
                         ("top1_from_start", groups["top1_from_start"]))}
  results["seeds"]["layer0_train_max_load_dev_after_switch"] = {
      **{g: _band(v) for g, v in after.items()},
      "seeds_converted_less_balanced": int(np.sum(np.greater(after["converted_to_top1"],
                                                             after["top1_from_start"])))}
  final_layer0 = {g: [float(r.last("val_load_max_dev")[0]) for r in rs]
                  for g, rs in (("converted_to_top1", converted),
                                ("top1_from_start", groups["top1_from_start"]))}
  results["seeds"]["layer0_val_max_load_dev_final"] = {
      **{g: _band(v) for g, v in final_layer0.items()},
      "seeds_converted_less_balanced": int(np.sum(np.greater(
          final_layer0["converted_to_top1"], final_layer0["top1_from_start"])))}
  return results


def _drops_after_10pct(run: Run) -> np.ndarray:
  """Per layer: the share of training assignments dropped after the first 10% of the steps."""
  end = run.config.train.steps
  return _window(run, "drop_fraction", end // 10, end).mean(0)


def _paired_with_lbl(runs, kind: str) -> dict:
  """Each seed of `kind` against the plain-LBL run of the same seed (same batches): the final
  validation loss difference, the second half's most loaded expert per layer of both, the drops
  after the first 10% of both and their ratio, and the last evaluation's most loaded expert."""
  lbl = _by_seed(runs, "lbl")
  out = {}
  for name, run in _by_seed(runs, kind).items():
    ref = lbl[name]
    drops, ref_drops = _drops_after_10pct(run), _drops_after_10pct(ref)
    out[name] = {
        "val_loss": _final_loss(run), "lbl_val_loss": _final_loss(ref),
        "val_loss_minus_lbl": _final_loss(run) - _final_loss(ref),
        "second_half_max_load_dev_per_layer": _second_half_balance(run)["max_load_dev_per_layer"],
        "lbl_second_half_max_load_dev_per_layer":
            _second_half_balance(ref)["max_load_dev_per_layer"],
        "train_drop_fraction_after_10pct_per_layer": drops.tolist(),
        "lbl_train_drop_fraction_after_10pct_per_layer": ref_drops.tolist(),
        "drop_ratio_to_lbl_per_layer": (drops / ref_drops).tolist(),
        "drop_ratio_to_lbl_all_layers": float(drops.mean() / ref_drops.mean()),
        "final_max_load_dev_per_layer": run.last("val_load_max_dev").tolist(),
        "lbl_final_max_load_dev_per_layer": ref.last("val_load_max_dev").tolist()}
  return out


def _paired_summary(seeds: dict) -> dict:
  """Over the seeds of _paired_with_lbl: the paired loss difference, and in how many layers
  the second half's most loaded expert is higher than the LBL's (per seed)."""
  return {"val_loss_minus_lbl": _band([v["val_loss_minus_lbl"] for v in seeds.values()]),
          "layers_worse_balanced_than_lbl_second_half": {
              n: int(np.sum(np.greater(v["second_half_max_load_dev_per_layer"],
                                       v["lbl_second_half_max_load_dev_per_layer"])))
              for n, v in seeds.items()},
          "layers_better_balanced_than_lbl_final": {
              n: int(np.sum(np.less(v["final_max_load_dev_per_layer"],
                                    v["lbl_final_max_load_dev_per_layer"])))
              for n, v in seeds.items()},
          "worst_layer_second_half": {
              n: int(np.argmax(v["second_half_max_load_dev_per_layer"])) for n, v in seeds.items()},
          "drop_ratio_to_lbl_all_layers": _band([v["drop_ratio_to_lbl_all_layers"]
                                                 for v in seeds.values()])}


def loss_free(runs):
  """Fig. 3: loss-free balancing: bias magnitude per layer and the load against the LBL's (seed
  0 in the top-level fields; every seed, paired with the LBL run of the same seed, in
  `seeds`)."""
  free, lbl = runs["loss_free"], runs["lbl"]
  _, bias = free.series("bias_abs_mean")
  _, spread = free.series("bias_std")
  seeds = _paired_with_lbl(runs, "loss_free")
  for name, run in _by_seed(runs, "loss_free").items():
    seeds[name]["final_bias_abs_mean_per_layer"] = run.last("bias_abs_mean").tolist()
    seeds[name]["final_bias_std_per_layer"] = run.last("bias_std").tolist()
  return {
      "final_bias_abs_mean_per_layer": bias[-1].tolist(),
      # The spread of b across experts: the part of the bias that changes which expert wins.
      "final_bias_std_per_layer": spread[-1].tolist(),
      "second_half": {"loss_free": _second_half_balance(free),
                      "lbl": _second_half_balance(lbl)},
      "final_max_load_dev_per_layer": {"loss_free": free.last("val_load_max_dev").tolist(),
                                       "lbl": lbl.last("val_load_max_dev").tolist()},
      "final_min_load_dev_per_layer": {"loss_free": free.last("val_load_min_dev").tolist(),
                                       "lbl": lbl.last("val_load_min_dev").tolist()},
      "val_loss": {"loss_free": _final_loss(free), "lbl": _final_loss(lbl)},
      "seeds": seeds, "over_seeds": _paired_summary(seeds),
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
    train_max = _window(run, "load_max_dev", lo, hi)
    tenths.append({"steps": [lo + 1, hi],
                   "train_max_load_dev_per_layer": train_max.mean(0).tolist(),
                   "train_drop_fraction_per_layer":
                       _window(run, "drop_fraction", lo, hi).mean(0).tolist(),
                   "bias_abs_mean_per_layer": _window(run, "bias_abs_mean", lo, hi)[-1].tolist(),
                   "bias_std_per_layer": _window(run, "bias_std", lo, hi)[-1].tolist()})
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
  results = {"val_loss": {"top1_lbl": _final_loss(top1), "lbl": _final_loss(lbl)}}
  for key in ("max", "min"):
    values = {name: run.last(f"val_load_{key}_dev") for name, run in (("top1_lbl", top1),
                                                                        ("lbl", lbl))}
    results[f"final_{key}_load_dev_per_layer"] = {k: v.tolist() for k, v in values.items()}
    results[f"{key}_load_dev"] = {k: _lower_vs_upper(v) for k, v in values.items()}
  # Over training (the paper's Fig. 4 is a curve): the lowest quarter's most loaded expert at
  # each evaluation, Top-1 LBL against every seed of the plain LBL.
  steps, top1_dev = top1.series("val_load_max_dev")
  lower = max(1, top1_dev.shape[1] // 4)
  lbl_seeds = _by_seed(runs, "lbl")
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
             "final_val_loss": _final_loss(r), **_second_half_balance(r),
             "final_min_load_dev_per_layer": r.last("val_load_min_dev").tolist()}
      for name, r in runs.items() if split_seed(name)[0].startswith("top1_lbl")
      and not split_seed(name)[1]}
  results["seeds"] = _paired_with_lbl(runs, "top1_lbl")
  results["over_seeds"] = _paired_summary(results["seeds"])
  lower_of = lambda v, key: float(np.mean(v[key][:lower]))
  results["over_seeds"]["second_half_lower_layers_max_load_dev"] = {
      n: {"top1_lbl": lower_of(v, "second_half_max_load_dev_per_layer"),
          "lbl": lower_of(v, "lbl_second_half_max_load_dev_per_layer")}
      for n, v in results["seeds"].items()}
  results["lbl_seeds"] = {
      "final_val_loss": _band([_final_loss(r) for r in lbl_seeds.values()]),
      "second_half_lower_layers_max_load_dev": _band(
          [_second_half_balance(r)["max_load_dev"]["lower_layers_mean"]
           for r in lbl_seeds.values()])}
  return results


def domain_information(run: Run):
  """(steps, [evals, layers] mutual information in bits between expert choice and domain)."""
  steps, english = run.series("english_val_tokens_per_expert")
  _, python = run.series("python_val_tokens_per_expert")
  counts = np.stack([english, python], axis=1)  # [evals, domains, layers, E]
  return steps, np.stack([np.asarray(expert_domain_mutual_information(c)) for c in counts])


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
      "val_loss": {"moe": _final_loss(moe), "dense": _final_loss(dense_run)},
      "active_params": {"moe": moe.active_params(end), "dense": dense_run.active_params(end)},
      "total_params": {"moe": count_params(moe.model())["total"],
                       "dense": count_params(dense_run.model())["total"]},
      "tokens": int(end * moe.config.train.batch_size * moe.config.train.seq_len),
  }


def seed_noise(runs):
  """How much runs of the same config differ (each seed its own initialisation and data order):
  the yardstick for every comparison. Pairwise differences, the largest over the pairs."""
  seeds = _by_seed(runs, "lbl")
  finals = {n: _final_loss(r) for n, r in seeds.items()}
  series = {n: r.series("val_loss") for n, r in seeds.items()}
  names = list(seeds)
  pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
  late = lambda a, b: float(np.mean(np.abs(series[a][1] - series[b][1])[
      series[a][0] >= series[a][0][-1] / 2]))
  balance = {n: _second_half_balance(r) for n, r in seeds.items()}
  per_layer = np.array([balance[n]["max_load_dev_per_layer"] for n in names])
  return {
      "seeds": len(names),
      "val_loss": finals,
      "val_loss_abs_diff_final_max": max(abs(finals[a] - finals[b]) for a, b in pairs),
      "val_loss_abs_diff_mean_second_half_max": max(late(a, b) for a, b in pairs),
      "second_half_max_load_dev_per_layer": {"min": per_layer.min(0).tolist(),
                                             "max": per_layer.max(0).tolist()},
      "second_half_max_load_dev_range_per_layer": np.ptp(per_layer, 0).tolist(),
      "final_max_load_dev_per_layer": {n: r.last("val_load_max_dev").tolist()
                                       for n, r in seeds.items()},
      "final_lbl_per_layer": {n: r.last("val_lbl_per_layer").tolist() for n, r in seeds.items()},
      "paired": paired_noise(runs),
  }


# Paired comparisons with three seeds: a run branched from phase 1's checkpoint against phase 1
# kept (they share everything up to the branch), and a run trained from scratch against the
# plain-LBL run of the same seed (they share only the initialisation seed and the batches).
BRANCH_KINDS = tuple(TRANSITIONS)
FROM_SCRATCH_KINDS = ("phase1", "adaptive", "loss_free", "top1_lbl")


def paired_noise(runs) -> dict:
  """The spread over seeds of paired final validation-loss differences: per kind the sample SD
  (ddof 1) of its per-seed difference, pooled over the kinds of each family, and the bar a
  single-seed paired difference must clear to count (twice the pooled SD)."""
  out = {}
  for family, kinds, reference in (("branch", BRANCH_KINDS, "phase1"),
                                   ("from_scratch", FROM_SCRATCH_KINDS, "lbl")):
    per_kind = {}
    for kind in kinds:
      pairs = [(runs[n], runs[n.replace(kind, reference, 1)])
               for n in sorted(runs, key=lambda n: split_seed(n)[1])
               if split_seed(n)[0] == kind and n.replace(kind, reference, 1) in runs]
      if len(pairs) >= 2:
        diffs = [_final_loss(a) - _final_loss(b) for a, b in pairs]
        per_kind[kind] = {"per_seed": diffs, "sd": float(np.std(diffs, ddof=1))}
    if per_kind:
      pooled = float(np.sqrt(np.mean([v["sd"] ** 2 for v in per_kind.values()])))
      out[family] = {"reference": reference, "per_kind": per_kind, "pooled_sd": pooled,
                     "bar": 2 * pooled}
  return out


ADAPTIVE_GROUPS = {"top1_from_start": "lbl", "manual": "progressive", "adaptive": "adaptive"}


def _seeded(runs, kind: str):
  """The runs of one kind for every seed, in seed order ("lbl", "lbl_seed1", ...); the manual
  schedule's phase-1 runs joined with their conversions."""
  names = sorted((n for n in runs if n == kind or n.startswith(kind + "_seed")),
                 key=lambda n: split_seed(n)[1])
  if kind == "progressive":
    return [joined(runs[n.replace("progressive", "phase1")], runs[n]) for n in names]
  return [runs[n] for n in names]


def _band(values) -> Dict[str, float]:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
          "per_seed": values.tolist()}


def mean_active_params(run: Run) -> float:
  """Activated parameters per token averaged over the logged training steps (the k each step
  ran with, from its logged top_k): the compute a schedule spends."""
  _, top_k = run.series("top_k")
  model = run.model()
  return float(np.mean([count_params(model, [int(k) for k in ks])["active"] for ks in top_k]))


def _window(run: Run, key: str, lo: int, hi: int) -> np.ndarray:
  steps, values = run.series(key)
  return values[(steps > lo) & (steps <= hi)]


def rule_driven_changes(run: Run):
  """[(logged step, layer, k before, k after)] of an adaptive run: every change of a layer's k
  that its ceiling alone does not explain (the ceiling alone gives min(k before, ceiling)). The
  record of step n holds the k of the step that ran from state step n - 1."""
  schedule = run.schedule()
  logged, top_k = run.series("top_k")
  ceiling = np.asarray([schedule.ceiling(int(n) - 1) for n in logged[1:]])
  expected = np.minimum(top_k[:-1], ceiling)
  return [(int(logged[i + 1]), int(layer), int(top_k[i, layer]), int(top_k[i + 1, layer]))
          for i, layer in zip(*np.nonzero(top_k[1:] != expected))]


def window_shares(run: Run, window: int, fraction: float, until: int) -> list:
  """Per layer: the share of `window`-step windows up to step `until` in which the layer's
  per-step first-choice max load was at or below that step's median layer in at least
  `fraction` of the steps (what a windowed calm count would have seen; unsmoothed)."""
  logged, dev = run.series("first_choice_max_dev")
  dev = dev[logged <= until]
  ready = (dev <= np.median(dev, axis=1, keepdims=True)).astype(np.float64)
  sums = np.cumsum(np.vstack([np.zeros((1, ready.shape[1])), ready]), axis=0)
  in_window = (sums[window:] - sums[:-window]) / window
  return np.mean(in_window >= fraction, axis=0).tolist()


def adaptive(runs):
  """Issue 16: the adaptive schedule (calm steps in a row) against the paper's manual one and
  top-1 from the start."""
  results = _adaptive_study(runs, ADAPTIVE_GROUPS)
  # What a windowed count would have seen in these runs: the basis of adaptive_window's rule.
  shares = {}
  for name, r in zip(("seed0", "seed1", "seed2"), _seeded(runs, "adaptive")):
    if len(r.series("first_choice_max_dev")[0]):
      shares[name] = window_shares(r, ADAPTIVE_WINDOW, ADAPTIVE_CALM_FRACTION,
                                   results["switch_step"])
  results["window_shares_at_or_above_calm_fraction"] = {
      "window": ADAPTIVE_WINDOW, "calm_fraction": ADAPTIVE_CALM_FRACTION, "per_layer": shares}
  return results


ADAPTIVE_WINDOW_GROUPS = {"top1_from_start": "lbl", "manual": "progressive", "ramp": "ramp",
                          "adaptive": "adaptive_window"}


def adaptive_window(runs):
  """Issue 24: the adaptive rule with calm steps counted over a window, against the manual
  schedule, the linear ramp alone (the same schedule with its rule off) and top-1."""
  return _adaptive_study(runs, ADAPTIVE_WINDOW_GROUPS)


def _adaptive_study(runs, kinds):
  """An adaptive schedule against the paper's manual one and top-1 from the start (and the ramp
  alone when `kinds` has one), at equal tokens and equal final top-k, over seeds (each seed its
  own initialisation and data order, shared by the schedules, so per-seed differences are
  paired)."""
  groups = {g: _seeded(runs, kind) for g, kind in kinds.items()}
  seeds = len(groups["top1_from_start"])
  if any(len(g) != seeds for g in groups.values()):
    raise ValueError("the adaptive study needs every schedule at every seed")
  config = groups["manual"][0].config
  steps, switch = config.train.steps, int(round(SWITCH_FRACTION * config.train.steps))
  final = {g: [_final_loss(r) for r in rs] for g, rs in groups.items()}
  pairs = [(a, b) for i, a in enumerate(reversed(list(groups)))
           for b in list(reversed(list(groups)))[i + 1:]]
  results = {
      "seeds": seeds, "switch_step": switch, "steps": steps, "groups": dict(kinds),
      "capacity_factor": float(config.model.capacity_factor),
      "final_val_loss": {g: _band(v) for g, v in final.items()},
      "final_val_loss_difference": {
          f"{a}_minus_{b}": _band(np.subtract(final[a], final[b])) for a, b in pairs},
      "mean_active_params": {g: _band([mean_active_params(r) for r in rs])
                             for g, rs in groups.items()},
      "final_active_params": {g: count_params(rs[0].model(), [int(k) for k in
                                                               rs[0].last("top_k")])["active"]
                              for g, rs in groups.items()},
  }
  # Balance: the most loaded expert per layer on the validation set, averaged over the second
  # half of training, and the share of training assignments dropped after the first 10%.
  results["second_half_max_load_dev_per_layer"] = {}
  results["train_drop_fraction_after_10pct_per_layer"] = {}
  results["train_drop_fraction_after_10pct_worst_layer"] = {}
  for g, rs in groups.items():
    halves, drops = [], []
    for r in rs:
      eval_steps, dev = r.series("val_load_max_dev")
      halves.append(dev[eval_steps >= steps / 2].mean(0))
      drops.append(_window(r, "drop_fraction", steps // 10, steps).mean(0))
    results["second_half_max_load_dev_per_layer"][g] = {
        "mean": np.mean(halves, 0).tolist(), "min": np.min(halves, 0).tolist(),
        "max": np.max(halves, 0).tolist()}
    results["train_drop_fraction_after_10pct_per_layer"][g] = np.mean(drops, 0).tolist()
    results["train_drop_fraction_after_10pct_worst_layer"][g] = float(np.max(drops))
  # Layer 0 at top-1 after the switch: its most loaded expert at the last evaluation.
  results["layer0_val_max_load_dev_final"] = {
      g: _band([float(r.last("val_load_max_dev")[0]) for r in rs]) for g, rs in groups.items()}
  # The switch: per-step training loss minus top-1-from-start's on the same batch (same seed,
  # same data order), averaged over the 20 steps before and after the manual switch.
  around = {}
  for g in [g for g in groups if g != "top1_from_start"]:
    before, after = [], []
    for run, ref in zip(groups[g], groups["top1_from_start"]):
      delta = _window(run, "lm_loss", switch - 60, steps) - _window(ref, "lm_loss",
                                                                     switch - 60, steps)
      logged = run.series("lm_loss")[0]
      logged = logged[(logged > switch - 60) & (logged <= steps)]
      before.append(delta[(logged > switch - 20) & (logged <= switch)].mean())
      after.append(delta[(logged > switch) & (logged <= switch + 20)].mean())
    around[g] = {"lm_loss_minus_top1_before_switch": _band(before),
                 "lm_loss_minus_top1_after_switch": _band(after),
                 "jump": _band(np.subtract(after, before))}
  results["switch"] = around
  # When each layer of the adaptive runs reached top-1 (first logged step at k = 1).
  reached = []
  for r in groups["adaptive"]:
    logged, top_k = r.series("top_k")
    reached.append([int(logged[np.argmax(top_k[:, l] <= 1)]) for l in range(top_k.shape[1])])
  results["adaptive_step_reaching_top1_per_layer"] = reached
  # The changes the rule made, beyond what the ceiling forced: (logged step, layer, from, to).
  results["adaptive_rule_driven_changes"] = {
      f"seed{i}": rule_driven_changes(r) for i, r in enumerate(groups["adaptive"])}
  # What the adaptive rule saw: the top-1 (first-choice) load's most loaded expert per layer
  # before the switch, and how often each layer was no worse than that step's median layer.
  seen = {}
  for name, r in zip(("seed0", "seed1", "seed2"), groups["adaptive"]):
    logged, dev = r.series("first_choice_max_dev")
    if not len(logged):
      continue  # a run logged before the metric existed
    early = dev[logged <= switch]
    seen[name] = {
        "mean_first_choice_max_dev_per_layer": early.mean(0).tolist(),
        "share_of_steps_at_or_below_median_per_layer": np.mean(
            early <= np.median(early, axis=1, keepdims=True), axis=0).tolist(),
        "steps": int(len(early))}
  results["adaptive_first_choice_before_switch"] = seen
  return results


def _switch_effect(run: Run, keep: Run, top1: Run, switch: int) -> dict:
  """One converted run against phase 1 kept (`keep`) and top-1 from the start (`top1`), all on
  the same batches: per-step training loss differences in windows around the switch, layer 0's
  most loaded expert, and the final validation losses."""
  start, end = run.config.train.init_step, run.config.train.steps
  steps, loss = run.series("lm_loss")
  keep_steps, keep_loss = keep.series("lm_loss")
  after = steps > start
  if not np.array_equal(steps[after], keep_steps[keep_steps > start]):
    raise ValueError(f"{run.name} and {keep.name} logged different steps after {start}")
  delta = loss[after] - keep_loss[keep_steps > start]
  moving = np.convolve(delta, np.ones(10) / 10, mode="valid")
  def window(lo, hi):
    inside = delta[(steps[after] > lo) & (steps[after] <= hi)]
    return float(inside.mean()) if len(inside) else None
  layer0 = lambda r, lo, hi: float(_window(r, "load_max_dev", lo, hi).mean(0)[0])
  loss_windows = {"during_change": window(start, switch) if switch > start else 0.0,
                  "first_20_after": window(switch, switch + 20),
                  "20_to_100_after": window(switch + 20, switch + 100),  # none in a short run
                  "last_20": window(end - 20, end),
                  "peak_10_step_mean": float(moving.max())}
  return {
      "lm_loss_minus_keep": {k: v for k, v in loss_windows.items() if v is not None},
      "layer0_max_load_dev": {
          "20_before": layer0(run, switch - 20, switch),
          "first_20_after": layer0(run, switch, switch + 20),
          "last_20": layer0(run, end - 20, end),
          "top1_from_start_last_20": layer0(top1, end - 20, end)},
      "final_val_loss": _final_loss(run),
      "final_val_minus_keep": _final_loss(run) - _final_loss(keep),
      "final_val_minus_top1": _final_loss(run) - _final_loss(top1),
      "mean_active_params": mean_active_params(run),
  }


def _bands(dicts):
  """The same nested dict of numbers from several seeds -> one dict of _band()s."""
  first = dicts[0]
  if isinstance(first, dict):
    return {k: _bands([d[k] for d in dicts]) for k in first}
  return _band(dicts)


def transition(runs):
  """The switch to top-1 at 50%, 70% and 90% of the run, abrupt or gradual, each from phase 1's
  checkpoint of the same seed: the loss against phase 1 kept (same batches), layer 0's load,
  the final validation loss and the compute spent; bands over the seeds present."""
  results = {}
  for name, (gradual, fraction) in TRANSITIONS.items():
    per_seed = []
    for seed_name, run in _by_seed(runs, name).items():
      suffix = "" if seed_name == "seed0" else "_" + seed_name
      keep, top1 = runs["phase1" + suffix], runs["lbl" + suffix]
      switch = int(round(fraction * run.config.train.steps))
      per_seed.append(_switch_effect(joined(keep, run), keep, top1, switch))
    results[name] = {"gradual": gradual, "switch_fraction": fraction,
                     "seeds": len(per_seed), **_bands(per_seed)}
  keep = [_final_loss(r) for r in _by_seed(runs, "phase1").values()]
  top1 = [_final_loss(r) for r in _by_seed(runs, "lbl").values()]
  results["keep_phase1_final_val_loss"] = _band(keep)
  results["top1_from_start_final_val_loss"] = _band(top1)
  return results
