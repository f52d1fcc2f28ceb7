"""How much two runs differ by their seed alone: the noise bar the other studies are read
against."""

from __future__ import annotations

import numpy as np

from experiments.studies.analyses.common import by_seed, final_loss, second_half_balance
from experiments.studies.variants import TRANSITIONS, split_seed


def seed_noise(runs):
  """How much runs of the same config differ (each seed its own initialisation and data order):
  the yardstick for every comparison. Pairwise differences, the largest over the pairs."""
  seeds = by_seed(runs, "lbl")
  finals = {n: final_loss(r) for n, r in seeds.items()}
  series = {n: r.series("val_loss") for n, r in seeds.items()}
  names = list(seeds)
  pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
  late = lambda a, b: float(np.mean(np.abs(series[a][1] - series[b][1])[
      series[a][0] >= series[a][0][-1] / 2]))
  balance = {n: second_half_balance(r) for n, r in seeds.items()}
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
        diffs = [final_loss(a) - final_loss(b) for a, b in pairs]
        per_kind[kind] = {"per_seed": diffs, "sd": float(np.std(diffs, ddof=1))}
    if per_kind:
      pooled = float(np.sqrt(np.mean([v["sd"] ** 2 for v in per_kind.values()])))
      out[family] = {"reference": reference, "per_kind": per_kind, "pooled_sd": pooled,
                     "bar": 2 * pooled}
  return out
