"""Sparsity studies: progressive sparsification, the transition between phases, adaptive top-k."""

from __future__ import annotations

import numpy as np

from experiments.studies.analyses.common import (band, bands_of, by_seed, final_loss,
                                                 second_half_balance, seeded, series_window,
                                                 mean_active_params)
from experiments.studies.runs import Run, joined
from experiments.studies.variants import (ADAPTIVE_CALM_FRACTION, ADAPTIVE_WINDOW, SWITCH_FRACTION,
                                          TRANSITIONS)
from sigma_moe_jax.params import count_params


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
      "val_loss": {"top1_from_start": final_loss(top1), "keep_phase1": final_loss(keep),
                   "converted_to_top1": final_loss(convert)},
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
  groups = {"top1_from_start": seeded(runs, "lbl"), "keep_phase1": seeded(runs, "phase1"),
            "converted_to_top1": seeded(runs, "progressive")}
  results["seeds"] = {**_progressive_losses(groups), **_progressive_balance(groups, branch, end)}
  return results


def _progressive_losses(groups) -> dict:
  """Final validation losses over seeds, and their paired differences."""
  final = {g: [final_loss(r) for r in rs] for g, rs in groups.items()}
  return {
      "final_val_loss": {g: band(v) for g, v in final.items()},
      "converted_minus_keep": band(np.subtract(final["converted_to_top1"],
                                                final["keep_phase1"])),
      "converted_minus_top1": band(np.subtract(final["converted_to_top1"],
                                                final["top1_from_start"])),
      "keep_minus_top1": band(np.subtract(final["keep_phase1"], final["top1_from_start"])),
      # Table 3's question as a share: how much of phase 1's gain over top-1 from the start the
      # conversion keeps, (top-1 - converted) / (top-1 - kept); None at a seed where phase 1
      # has no gain to keep.
      "converted_share_of_phase1_gain": [
          (t - c) / (t - k) if t - k > 0 else None for t, k, c in zip(
              final["top1_from_start"], final["keep_phase1"], final["converted_to_top1"])],
      "second_half_max_load_dev_lower_layers": {
          g: band([second_half_balance(r)["max_load_dev"]["lower_layers_mean"] for r in rs])
          for g, rs in groups.items()},
  }


def _progressive_balance(groups, branch: int, end: int) -> dict:
  """Drops, the loss jump at the switch, and layer 0's balance after it, over seeds."""
  results = {}
  # Drops confound quality: the worst layer's share of training assignments dropped after the
  # first 10% of the steps (the converted runs joined to their phase-1 runs before the branch).
  converted = groups["converted_to_top1"]
  results["train_drop_fraction_after_10pct_worst_layer"] = {
      g: band([float(series_window(r, "drop_fraction", end // 10, end).mean(0).max()) for r in rs])
      for g, rs in groups.items()}
  # The switch: training loss of the converted run minus phase 1 kept, on the same batches, over
  # the SWITCH_STEPS steps after the branch.
  results["switch_jump_lm_loss"] = band([
      float(np.mean(series_window(c, "lm_loss", branch, branch + SWITCH_STEPS)
                    - series_window(k, "lm_loss", branch, branch + SWITCH_STEPS)))
      for k, c in zip(groups["keep_phase1"], converted)])
  # Layer 0 after the switch, when every layer runs top-1: its most loaded expert on the
  # training batches, mean over the steps after the branch, against top-1 from the start on the
  # same batches (before the switch layer 0 of the converted run still routes to 4 experts).
  after = {g: [float(series_window(r, "load_max_dev", branch, end)[:, 0].mean()) for r in rs]
           for g, rs in (("converted_to_top1", converted),
                         ("top1_from_start", groups["top1_from_start"]))}
  results["layer0_train_max_load_dev_after_switch"] = {
      **{g: band(v) for g, v in after.items()},
      "seeds_converted_less_balanced": int(np.sum(np.greater(after["converted_to_top1"],
                                                             after["top1_from_start"])))}
  final_layer0 = {g: [float(r.last("val_load_max_dev")[0]) for r in rs]
                  for g, rs in (("converted_to_top1", converted),
                                ("top1_from_start", groups["top1_from_start"]))}
  results["layer0_val_max_load_dev_final"] = {
      **{g: band(v) for g, v in final_layer0.items()},
      "seeds_converted_less_balanced": int(np.sum(np.greater(
          final_layer0["converted_to_top1"], final_layer0["top1_from_start"])))}
  return results


ADAPTIVE_GROUPS = {"top1_from_start": "lbl", "manual": "progressive", "adaptive": "adaptive"}


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
  for name, r in zip(("seed0", "seed1", "seed2"), seeded(runs, "adaptive")):
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
  groups = {g: seeded(runs, kind) for g, kind in kinds.items()}
  seeds = len(groups["top1_from_start"])
  if any(len(g) != seeds for g in groups.values()):
    raise ValueError("the adaptive study needs every schedule at every seed")
  config = groups["manual"][0].config
  steps, switch = config.train.steps, int(round(SWITCH_FRACTION * config.train.steps))
  final = {g: [final_loss(r) for r in rs] for g, rs in groups.items()}
  pairs = [(a, b) for i, a in enumerate(reversed(list(groups)))
           for b in list(reversed(list(groups)))[i + 1:]]
  results = {
      "seeds": seeds, "switch_step": switch, "steps": steps, "groups": dict(kinds),
      "capacity_factor": float(config.model.capacity_factor),
      "final_val_loss": {g: band(v) for g, v in final.items()},
      "final_val_loss_difference": {
          f"{a}_minus_{b}": band(np.subtract(final[a], final[b])) for a, b in pairs},
      "mean_active_params": {g: band([mean_active_params(r) for r in rs])
                             for g, rs in groups.items()},
      "final_active_params": {g: count_params(rs[0].model(), [int(k) for k in
                                                               rs[0].last("top_k")])["active"]
                              for g, rs in groups.items()},
  }
  results.update(_adaptive_balance(groups, steps))
  results["switch"] = _adaptive_switch(groups, switch, steps)
  results.update(_adaptive_rule(groups["adaptive"], switch))
  return results


def _adaptive_balance(groups, steps: int) -> dict:
  """Balance: the most loaded expert per layer on the validation set, averaged over the second
  half of training, the share of training assignments dropped after the first 10%, and layer 0
  at top-1 after the switch (its most loaded expert at the last evaluation)."""
  results = {}
  results["second_half_max_load_dev_per_layer"] = {}
  results["train_drop_fraction_after_10pct_per_layer"] = {}
  results["train_drop_fraction_after_10pct_worst_layer"] = {}
  for g, rs in groups.items():
    halves, drops = [], []
    for r in rs:
      eval_steps, dev = r.series("val_load_max_dev")
      halves.append(dev[eval_steps >= steps / 2].mean(0))
      drops.append(series_window(r, "drop_fraction", steps // 10, steps).mean(0))
    results["second_half_max_load_dev_per_layer"][g] = {
        "mean": np.mean(halves, 0).tolist(), "min": np.min(halves, 0).tolist(),
        "max": np.max(halves, 0).tolist()}
    results["train_drop_fraction_after_10pct_per_layer"][g] = np.mean(drops, 0).tolist()
    results["train_drop_fraction_after_10pct_worst_layer"][g] = float(np.max(drops))
  results["layer0_val_max_load_dev_final"] = {
      g: band([float(r.last("val_load_max_dev")[0]) for r in rs]) for g, rs in groups.items()}
  return results


def _adaptive_switch(groups, switch: int, steps: int) -> dict:
  """The switch: per-step training loss minus top-1-from-start's on the same batch (same seed,
  same data order), averaged over the 20 steps before and after the manual switch."""
  around = {}
  for g in [g for g in groups if g != "top1_from_start"]:
    before, after = [], []
    for run, ref in zip(groups[g], groups["top1_from_start"]):
      delta = series_window(run, "lm_loss", switch - 60, steps) - series_window(ref, "lm_loss",
                                                                     switch - 60, steps)
      logged = run.series("lm_loss")[0]
      logged = logged[(logged > switch - 60) & (logged <= steps)]
      before.append(delta[(logged > switch - 20) & (logged <= switch)].mean())
      after.append(delta[(logged > switch) & (logged <= switch + 20)].mean())
    around[g] = {"lm_loss_minus_top1_before_switch": band(before),
                 "lm_loss_minus_top1_after_switch": band(after),
                 "jump": band(np.subtract(after, before))}
  return around


def _adaptive_rule(adaptive_runs, switch: int) -> dict:
  """When each layer of the adaptive runs reached top-1 (first logged step at k = 1), the
  changes the rule made beyond what the ceiling forced, and what the rule saw before the
  switch."""
  results = {}
  reached = []
  for r in adaptive_runs:
    logged, top_k = r.series("top_k")
    reached.append([int(logged[np.argmax(top_k[:, l] <= 1)]) for l in range(top_k.shape[1])])
  results["adaptive_step_reaching_top1_per_layer"] = reached
  # The changes the rule made, beyond what the ceiling forced: (logged step, layer, from, to).
  results["adaptive_rule_driven_changes"] = {
      f"seed{i}": rule_driven_changes(r) for i, r in enumerate(adaptive_runs)}
  # What the adaptive rule saw: the top-1 (first-choice) load's most loaded expert per layer
  # before the switch, and how often each layer was no worse than that step's median layer.
  seen = {}
  for name, r in zip(("seed0", "seed1", "seed2"), adaptive_runs):
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
  layer0 = lambda r, lo, hi: float(series_window(r, "load_max_dev", lo, hi).mean(0)[0])
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
      "final_val_loss": final_loss(run),
      "final_val_minus_keep": final_loss(run) - final_loss(keep),
      "final_val_minus_top1": final_loss(run) - final_loss(top1),
      "mean_active_params": mean_active_params(run),
  }


def transition(runs):
  """The switch to top-1 at 50%, 70% and 90% of the run, abrupt or gradual, each from phase 1's
  checkpoint of the same seed: the loss against phase 1 kept (same batches), layer 0's load,
  the final validation loss and the compute spent; bands over the seeds present."""
  results = {}
  for name, (gradual, fraction) in TRANSITIONS.items():
    per_seed = []
    for seed_name, run in by_seed(runs, name).items():
      suffix = "" if seed_name == "seed0" else "_" + seed_name
      keep, top1 = runs["phase1" + suffix], runs["lbl" + suffix]
      switch = int(round(fraction * run.config.train.steps))
      per_seed.append(_switch_effect(joined(keep, run), keep, top1, switch))
    results[name] = {"gradual": gradual, "switch_fraction": fraction,
                     "seeds": len(per_seed), **bands_of(per_seed)}
  keep = [final_loss(r) for r in by_seed(runs, "phase1").values()]
  top1 = [final_loss(r) for r in by_seed(runs, "lbl").values()]
  results["keep_phase1_final_val_loss"] = band(keep)
  results["top1_from_start_final_val_loss"] = band(top1)
  return results
