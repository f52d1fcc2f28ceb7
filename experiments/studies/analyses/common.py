"""What the analyses share: windows of a run's series, its seeds, bands over seeds, and paired
comparisons with the plain-LBL run of the same seed."""

from __future__ import annotations

from typing import Dict

import numpy as np

from experiments.studies.runs import Run, joined
from experiments.studies.variants import split_seed
from sigma_moe_jax.moe.balancing import expert_domain_mutual_information
from sigma_moe_jax.params import count_params


def lower_vs_upper(values: np.ndarray) -> Dict[str, float]:
  """Mean over the lowest quarter of the layers against the mean over the rest."""
  lower = max(1, len(values) // 4)
  return {"lower_layers_mean": float(np.mean(values[:lower])),
          "upper_layers_mean": float(np.mean(values[lower:]))}


def final_loss(run: Run) -> float:
  return float(run.last("val_loss"))


def by_seed(runs, kind: str) -> Dict[str, Run]:
  """{"seed0": runs[kind], "seed1": runs[kind + "_seed1"], ...} for the seeds present."""
  return {f"seed{split_seed(n)[1]}": r for n, r in sorted(
      runs.items(), key=lambda item: split_seed(item[0])[1]) if split_seed(n)[0] == kind}


def second_half_balance(run: Run) -> dict:
  """A run's balance on the validation set averaged over the second half of training (single
  evaluations are noisy): the most and least loaded expert, the load's CV across experts and
  the LBL per layer; the experts with no token at the last evaluation; and its training drops
  after the first 10% of the steps."""
  steps, max_dev = run.series("val_load_max_dev")
  _, min_dev = run.series("val_load_min_dev")
  _, lbl = run.series("val_lbl_per_layer")
  _, cv = run.series("val_load_cv")
  late = steps >= steps[-1] / 2
  end = run.config.train.steps
  empty = (np.asarray(run.last("val_tokens_per_expert")) == 0).sum(-1)
  return {"max_load_dev_per_layer": max_dev[late].mean(0).tolist(),
          "min_load_dev_per_layer": min_dev[late].mean(0).tolist(),
          "lbl_per_layer": lbl[late].mean(0).tolist(),
          "max_load_dev": lower_vs_upper(max_dev[late].mean(0)),
          "lbl": lower_vs_upper(lbl[late].mean(0)),
          "most_imbalanced_layer": int(np.argmax(max_dev[late].mean(0))),
          "train_drop_fraction_per_layer": series_window(run, "drop_fraction", end // 10,
                                                   end).mean(0).tolist(),
          "load_cv_per_layer": cv[late].mean(0).tolist(),
          "empty_experts_final_per_layer": empty.tolist()}


def seeded(runs, kind: str):
  """The runs of one kind for every seed, in seed order ("lbl", "lbl_seed1", ...); the manual
  schedule's phase-1 runs joined with their conversions."""
  names = sorted((n for n in runs if n == kind or n.startswith(kind + "_seed")),
                 key=lambda n: split_seed(n)[1])
  if kind == "progressive":
    return [joined(runs[n.replace("progressive", "phase1")], runs[n]) for n in names]
  return [runs[n] for n in names]


def band(values) -> Dict[str, float]:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
          "per_seed": values.tolist()}


def bands_of(dicts):
  """The same nested dict of numbers from several seeds -> one dict of band()s."""
  first = dicts[0]
  if isinstance(first, dict):
    return {k: bands_of([d[k] for d in dicts]) for k in first}
  return band(dicts)


def series_window(run: Run, key: str, lo: int, hi: int) -> np.ndarray:
  steps, values = run.series(key)
  return values[(steps > lo) & (steps <= hi)]


def mean_active_params(run: Run) -> float:
  """Activated parameters per token averaged over the logged training steps (the k each step
  ran with, from its logged top_k): the compute a schedule spends."""
  _, top_k = run.series("top_k")
  model = run.model()
  return float(np.mean([count_params(model, [int(k) for k in ks])["active"] for ks in top_k]))


def domain_information(run: Run):
  """(steps, [evals, layers] mutual information in bits between expert choice and domain)."""
  steps, english = run.series("english_val_tokens_per_expert")
  _, python = run.series("python_val_tokens_per_expert")
  counts = np.stack([english, python], axis=1)  # [evals, domains, layers, E]
  return steps, np.stack([np.asarray(expert_domain_mutual_information(c)) for c in counts])


def drops_after_10pct(run: Run) -> np.ndarray:
  """Per layer: the share of training assignments dropped after the first 10% of the steps."""
  end = run.config.train.steps
  return series_window(run, "drop_fraction", end // 10, end).mean(0)


def drops_in_first_10pct(run: Run) -> np.ndarray:
  """Per layer: the share of training assignments dropped in the first 10% of the steps (where
  even a capacity that later drops nothing still does)."""
  return series_window(run, "drop_fraction", 0, run.config.train.steps // 10).mean(0)


def paired_with_lbl(runs, kind: str) -> dict:
  """Each seed of `kind` against the plain-LBL run of the same seed (same batches): the final
  validation loss difference, the second half's most loaded expert per layer of both, the drops
  after the first 10% of both and their ratio, and the last evaluation's most loaded expert."""
  lbl = by_seed(runs, "lbl")
  out = {}
  for name, run in by_seed(runs, kind).items():
    ref = lbl[name]
    drops, ref_drops = drops_after_10pct(run), drops_after_10pct(ref)
    out[name] = {
        "val_loss": final_loss(run), "lbl_val_loss": final_loss(ref),
        "val_loss_minus_lbl": final_loss(run) - final_loss(ref),
        "second_half_max_load_dev_per_layer": second_half_balance(run)["max_load_dev_per_layer"],
        "lbl_second_half_max_load_dev_per_layer":
            second_half_balance(ref)["max_load_dev_per_layer"],
        "train_drop_fraction_after_10pct_per_layer": drops.tolist(),
        "lbl_train_drop_fraction_after_10pct_per_layer": ref_drops.tolist(),
        "drop_ratio_to_lbl_per_layer": (drops / ref_drops).tolist(),
        "drop_ratio_to_lbl_all_layers": float(drops.mean() / ref_drops.mean()),
        "final_max_load_dev_per_layer": run.last("val_load_max_dev").tolist(),
        "lbl_final_max_load_dev_per_layer": ref.last("val_load_max_dev").tolist(),
        "train_drop_fraction_first_10pct_per_layer": drops_in_first_10pct(run).tolist(),
        "lbl_train_drop_fraction_first_10pct_per_layer": drops_in_first_10pct(ref).tolist()}
  return out


def paired_summary(seeds: dict) -> dict:
  """Over the seeds of paired_with_lbl: the paired loss difference, and in how many layers
  the second half's most loaded expert is higher than the LBL's (per seed)."""
  return {"val_loss_minus_lbl": band([v["val_loss_minus_lbl"] for v in seeds.values()]),
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
          "drop_ratio_to_lbl_all_layers": band([v["drop_ratio_to_lbl_all_layers"]
                                                 for v in seeds.values()])}


def interval(values, confidence: float = 0.95) -> Dict[str, float]:
  """Mean, SD and the t interval of the mean of paired per-seed differences (n - 1 degrees of
  freedom, from the values' own spread)."""
  from scipy import stats  # noqa: PLC0415 (a dependency of jax; only the six-seed studies)
  values = np.asarray(values, np.float64)
  n, mean, sd = len(values), float(values.mean()), float(values.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
  return {"n": n, "mean": mean, "sd": sd, "low": float(mean - half), "high": float(mean + half)}


def with_intervals(analysis):
  """`analysis` whose results also hold `intervals`: the same tree cut down to its bands with
  two or more seeds (dicts with "per_seed"), each as its `interval`."""
  def cut(tree):
    if isinstance(tree, dict):
      if "per_seed" in tree:
        values = [v for v in tree["per_seed"] if v is not None]
        return interval(values) if len(values) > 1 else None
      cut_down = {k: cut(v) for k, v in tree.items()}
      return {k: v for k, v in cut_down.items() if v is not None} or None
    return None

  def analyse(runs):
    results = analysis(runs)
    return {**results, "intervals": cut(results) or {}}
  return analyse


def with_early_drops(analysis):
  """`analysis` whose results also hold `early_drops`: for each kind of run trained from scratch
  (a run branched from another has no first 10% of its own), per seed, the share of training
  assignments dropped over the first 10% of the steps and over the rest (means over layers)."""
  def analyse(runs):
    kinds = sorted({split_seed(n)[0] for n, r in runs.items()
                    if not r.config.train.init_from})
    early = {}
    for kind in kinds:
      seeds = by_seed(runs, kind).values()
      end = lambda r: r.config.train.steps
      early[kind] = {
          "first_10pct": band([float(drops_in_first_10pct(r).mean()) for r in seeds]),
          "after_10pct": band([float(series_window(r, "drop_fraction", end(r) // 10,
                                                   end(r)).mean()) for r in seeds])}
    return {**analysis(runs), "early_drops": early}
  return analyse
