"""The reproduction studies: variants, the analyses against NumPy on synthetic metrics, and the
launcher end to end on a tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import studies
from configs.reproduce import get_config
from sigma_moe_jax.data.pipeline import load_documents
from sigma_moe_jax.training.settings import model_and_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_study_selection():
  assert studies.selected_studies("all") == list(studies.STUDIES)
  # progressive starts from phase1's checkpoint, so phase1 is trained (first) even when only
  # the progressive study is asked for.
  assert studies.variant_order(["dense"]) == ["lbl", "dense"]
  # --train_only: only the variants named, with the phase-1 run a conversion starts from.
  assert studies.variant_order(["transition"], ["switch50_seed1"]) == ["phase1_seed1",
                                                                       "switch50_seed1"]
  order = studies.variant_order(["progressive"])
  assert sorted(order) == sorted(f"{v}{s}" for v in ("lbl", "phase1", "progressive")
                                 for s in ("", "_seed1", "_seed2"))
  assert order.index("phase1_seed2") < order.index("progressive_seed2")
  with pytest.raises(ValueError, match="unknown --study"):
    studies.selected_studies("imbalance,fig9")


def test_variants_change_only_what_they_compare(tmp_path):
  base = get_config()
  changed = {}
  for name in studies.VARIANTS:
    config = studies.variant_config(base, name, str(tmp_path))
    flat = lambda c: {(s, k): v for s in c for k, v in c[s].items()}
    changed[name] = {key for key, value in flat(config).items() if flat(base)[key] != value}
  assert changed["lbl"] == set()
  assert changed["phase1"] == {("schedule", "top_k")}
  assert changed["loss_free"] == {("model", "gate_fn"), ("balance", "loss"),
                                  ("balance", "loss_free")}
  assert changed["domains_global"] - changed["domains_sequence"] == set()
  progressive = studies.variant_config(base, "progressive", str(tmp_path))
  assert progressive.train.init_step == 540 and progressive.train.init_from.endswith("phase1")
  assert studies.variant_config(base, "domains_sequence", str(tmp_path)).model.lbl_mode == \
      "sequence"
  assert changed["lbl_seed2"] == {("train", "seed"), ("data", "order_seed")}
  assert changed["no_lbl"] == {("balance", "loss")}
  assert changed["deep"] == {("model", "num_layers")}
  assert changed["top1_lbl_coef1e-2"] == {("balance", "loss"), ("balance", "coef"),
                                         ("model", "top1_lbl_tau")}
  # The transition study: abrupt switches branch at the switch, gradual ones a tenth of the run
  # earlier and lower every layer above top-1 by one per stage.
  switch = studies.variant_config(base, "switch70_seed2", str(tmp_path))
  assert (switch.train.init_step, switch.train.seed) == (420, 2)
  assert switch.train.init_from.endswith("phase1_seed2")
  gradual = studies.variant_config(base, "gradual50", str(tmp_path))
  assert gradual.train.init_step == 240
  _, schedule = model_and_schedule(gradual)
  assert [list(map(int, schedule.top_k_at(s)))[:2] for s in (259, 260, 280, 299, 300, 599)] == \
      [[4, 2], [3, 1], [2, 1], [2, 1], [1, 1], [1, 1]]
  transition = studies.variant_order(["transition"])
  assert transition.index("phase1_seed1") < transition.index("gradual50_seed1")
  assert changed["adaptive"] == {("schedule", "kind"), ("schedule", "top_k"),
                                 ("schedule", "deadline")}
  # The windowed rule keeps patience at 50 (the default) and sets the calm fraction; the ramp
  # is the same schedule with its rule off.
  assert changed["adaptive_window"] == changed["adaptive"] | {("schedule", "calm_fraction")}
  assert changed["ramp"] == changed["adaptive"] | {("schedule", "patience"),
                                                   ("schedule", "raise_above")}
  seeded = studies.variant_config(base, "progressive_seed1", str(tmp_path))
  assert seeded.train.init_from.endswith("phase1_seed1") and seeded.train.seed == 1
  order = studies.variant_order(["adaptive"])
  assert order.index("phase1_seed2") < order.index("progressive_seed2")
  assert not os.listdir(tmp_path)  # building a config writes nothing (prepare_data does)


def test_domains_are_real_python_source_of_matching_size(tmp_path):
  base = get_config()
  paths = studies.prepare_domains(base, str(tmp_path))
  assert paths == studies.domain_paths(str(tmp_path))  # where the domains variants read
  english = sum(len(d) for s in ("train", "val") for d in load_documents(paths["english"][s]))
  python_train = load_documents(paths["python"]["train"])
  python_val = load_documents(paths["python"]["val"])
  python = sum(map(len, python_train + python_val))
  assert english <= python < english + 500_000
  assert all("def " in d or "import " in d or "class " in d for d in python_val)
  assert not set(python_train) & set(python_val)


def test_analyses_import_no_matplotlib():
  """matplotlib is imported by the figures only, when one is drawn (a fresh interpreter)."""
  code = ("import sys, experiments.studies.analyses; "
          "assert 'matplotlib' not in sys.modules, 'the analyses imported matplotlib'")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


def synthetic_run(name, config, steps, **series):
  records = {}
  for key, values in series.items():
    for step, value in zip(steps, values):
      records.setdefault(step, {"step": step})[key] = np.asarray(value).tolist()
  return studies.Run(name, config, records)


def test_analyses_report_what_the_metrics_say(tmp_path):
  rng = np.random.default_rng(0)
  base = get_config()
  layers, experts = base.model.num_layers, base.model.num_experts
  steps = [50, 100]
  counts = rng.integers(1, 100, size=(len(steps), layers, experts))
  f = counts / counts.sum(-1, keepdims=True)
  tokens = counts.copy()
  tokens[-1, 0, :3] = 0  # three experts of layer 0 get nothing at the last evaluation
  p = rng.dirichlet(np.ones(experts), size=(len(steps), layers))
  common = dict(val_load_max_dev=f.max(-1) * experts - 1, val_load_min_dev=f.min(-1) * experts - 1,
                val_f=f, val_p=p, val_load_cv=f.std(-1) * experts,
                val_gate_prob_cv=p.std(-1) * experts, val_lbl_per_layer=experts * (f * p).sum(-1),
                val_loss=[5.0, 4.5], drop_fraction=np.zeros((2, layers)),
                val_tokens_per_expert=tokens)
  lbl = synthetic_run("lbl", base, steps, **common)
  other = synthetic_run("lbl_seed1", base, steps, **{**common, "val_load_max_dev": np.ones(
      (2, layers)) * np.arange(layers)})
  control = synthetic_run("no_lbl", base, steps, **{**common, "val_loss": [6.0, 5.5]})
  results, figures = studies.STUDIES["imbalance"].analyze(
      {"lbl": lbl, "lbl_seed1": other, "no_lbl": control}, str(tmp_path))
  # Seeds: the evaluations in the second half of training (both: 50 >= 100 / 2), per seed.
  assert results["seeds"]["seed1"]["max_load_dev_per_layer"] == list(range(layers))
  assert results["seeds"]["seed1"]["max_load_dev"]["lower_layers_mean"] == 0.5
  assert results["seeds"]["seed0"]["max_load_dev_per_layer"] == pytest.approx(
      (f.max(-1) * experts - 1).mean(0))
  assert results["no_lbl"]["final_val_loss"] == 5.5
  assert results["seeds"]["seed0"]["empty_experts_final_per_layer"] == [3] + [0] * (layers - 1)
  assert results["seeds"]["seed0"]["load_cv_per_layer"] == pytest.approx(
      (f.std(-1) * experts).mean(0))
  final = f[-1].max(-1) * experts - 1
  assert results["max_load_dev"]["lower_layers_mean"] == pytest.approx(final[:2].mean())
  assert results["most_imbalanced_layer"] == int(np.argmax(final))
  lbl_values = experts * (f * p).sum(-1)
  assert results["second_half_mean_lbl_per_layer"] == pytest.approx(lbl_values.mean(0))
  assert all(os.path.getsize(path) > 10_000 for path in figures)

  results, _ = studies.STUDIES["shortcut"].analyze({"lbl": lbl}, str(tmp_path))
  worst = int(np.argmax(f[-1].std(-1)))
  assert results["least_balanced_layer"]["layer"] == worst
  assert results["least_balanced_layer"]["f_max"] == pytest.approx(f[-1, worst].max())
  top = results["top_layer"]
  assert top["lbl"] == pytest.approx(experts * np.sum(f[-1, -1] * p[-1, -1]))
  # The identity the study leans on: LBL = 1 + E * sum (f - 1/E)(p - 1/E).
  assert top["lbl"] == pytest.approx(
      1 + experts * np.sum((f[-1, -1] - 1 / experts) * (p[-1, -1] - 1 / experts)))

  english, python = counts, counts[:, :, ::-1]
  domain_configs = {m: studies.variant_config(base, f"domains_{m}", str(tmp_path))
                    for m in studies.DOMAIN_MODES}
  runs = {f"domains_{m}": synthetic_run(
      m, domain_configs[m], steps, english_val_tokens_per_expert=english,
      python_val_tokens_per_expert=python if m == "global" else english,
      english_val_loss=[3, 2], python_val_loss=[3, 2], english_val_load_max_dev=[[0] * layers] * 2,
      python_val_load_max_dev=[[0] * layers] * 2) for m in studies.DOMAIN_MODES}
  results, _ = studies.STUDIES["domains"].analyze(runs, str(tmp_path))
  info = results["mutual_information_bits"]
  assert info["micro_batch"]["mean"] == pytest.approx(0, abs=1e-6)
  for layer in range(layers):
    joint = np.stack([english[-1, layer] / english[-1, layer].sum(),
                      python[-1, layer] / python[-1, layer].sum()]) / 2
    marginal = joint.sum(0)
    want = np.sum(joint * np.log2(joint / (0.5 * marginal)))
    assert info["global"]["per_layer"][layer] == pytest.approx(want, rel=1e-4)


@pytest.mark.integration
def test_launcher_trains_reuses_and_refuses(tmp_path):
  """A tiny dense-vs-MoE study end to end; a second call reuses both runs; another config on the
  same workdir is refused and leaves the runs as they were."""
  tiny = ["--config.model.d_model=32", "--config.model.num_layers=2",
          "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
          "--config.model.head_dim=16", "--config.model.num_experts=4",
          "--config.model.d_ff=32", "--config.train.batch_size=4", "--config.train.seq_len=32",
          "--config.train.steps=4", "--config.train.warmup_steps=1",
          "--config.train.eval_every=2", "--config.train.eval_batches=1",
          "--config.train.checkpoint_every=2", "--config.train.peak_flops=1e12"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  cmd = [sys.executable, "-m", "experiments.reproduce", "--study=dense",
         f"--workdir={tmp_path}", *tiny]
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count("=== training") == 2
  results = json.load(open(tmp_path / "dense" / "results.json"))
  metrics = [json.loads(line) for line in open(tmp_path / "runs" / "dense" / "metrics.jsonl")]
  assert results["val_loss"]["dense"] == metrics[-1]["val_loss"]
  assert results["active_params"]["dense"] < results["active_params"]["moe"]
  assert os.path.exists(tmp_path / "dense" / "dense.png")

  again = subprocess.run(cmd + [f"--ship={tmp_path / 'shipped'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
  assert again.returncode == 0 and "=== training" not in again.stdout, again.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "shipped")) == ["dense.json.gz", "lbl.json.gz"]
  shipped_results = json.load(open(tmp_path / "dense" / "results.json"))
  # From the shipped runs alone, in another workdir, nothing trained: the same results.
  check = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--study=dense",
                          f"--runs_from={tmp_path / 'shipped'}", f"--workdir={tmp_path / 'check'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert check.returncode == 0, check.stderr[-3000:]
  assert json.load(open(tmp_path / "check" / "dense" / "results.json")) == shipped_results
  assert shipped_results["val_loss"]["dense"] == pytest.approx(results["val_loss"]["dense"],
                                                              rel=1e-5)
  assert not os.path.exists(tmp_path / "check" / "runs")

  before = open(tmp_path / "runs" / "dense" / "metrics.jsonl").read()
  other = subprocess.run(cmd + ["--config.train.lr=1e-2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
  assert other.returncode != 0
  assert "made with another config" in other.stderr.strip().splitlines()[-1]
  assert open(tmp_path / "runs" / "dense" / "metrics.jsonl").read() == before


def test_adaptive_analysis_pairs_seeds_and_counts_compute(tmp_path):
  """Synthetic runs with known losses and top-k: the paired differences, the activated
  parameters averaged over the logged steps, and the loss jump at the switch."""
  from sigma_moe_jax.params import count_params
  base = get_config()
  base.train.steps, base.train.checkpoint_every = 100, 10
  layers = base.model.num_layers
  steps = list(range(1, 101))
  switch = 90
  runs = {}
  for seed, suffix in enumerate(("", "_seed1")):
    lm = 5.0 - 0.01 * np.arange(100) + 0.1 * seed
    k1 = [[1] * layers] * 100
    runs["lbl" + suffix] = synthetic_run(
        "lbl", studies.variant_config(base, "lbl" + suffix, str(tmp_path)), steps,
        lm_loss=lm, top_k=k1, val_loss=lm, drop_fraction=np.zeros((100, layers)),
        val_load_max_dev=np.ones((100, layers)))
    phase1 = [[4, 2] + [1] * (layers - 2)] * 100
    runs["phase1" + suffix] = synthetic_run(
        "phase1", studies.variant_config(base, "phase1" + suffix, str(tmp_path)), steps,
        lm_loss=lm - 0.05, top_k=phase1, val_loss=lm - 0.05,
        drop_fraction=np.zeros((100, layers)), val_load_max_dev=np.ones((100, layers)))
    progressive = studies.variant_config(base, "progressive" + suffix, str(tmp_path))
    runs["progressive" + suffix] = synthetic_run(
        "progressive", progressive, steps[switch:], lm_loss=lm[switch:] + 0.2,
        top_k=k1[switch:], val_loss=lm[switch:] - 0.02,
        drop_fraction=np.zeros((10, layers)), val_load_max_dev=np.ones((10, layers)))
    adaptive_k = [[2, 2] + [1] * (layers - 2)] * 50 + k1[:50]
    runs["adaptive" + suffix] = synthetic_run(
        "adaptive", studies.variant_config(base, "adaptive" + suffix, str(tmp_path)), steps,
        lm_loss=lm - 0.03, top_k=adaptive_k, val_loss=lm - 0.04 - 0.01 * seed,
        first_choice_max_dev=[[3.0, 2.0] + [1.0] * (layers - 2)] * 100,
        drop_fraction=np.zeros((100, layers)), val_load_max_dev=np.ones((100, layers)))
  results, figures = studies.STUDIES["adaptive"].analyze(runs, str(tmp_path))
  assert all(os.path.getsize(path) > 10_000 for path in figures)
  diff = results["final_val_loss_difference"]["adaptive_minus_manual"]
  assert diff["per_seed"] == pytest.approx([-0.02, -0.03])
  model = runs["lbl"].model()
  want = np.mean([count_params(model, [2, 2] + [1] * (layers - 2))["active"]] * 50
                 + [count_params(model, [1] * layers)["active"]] * 50)
  assert results["mean_active_params"]["adaptive"]["mean"] == pytest.approx(want)
  manual = results["switch"]["manual"]
  assert manual["lm_loss_minus_top1_before_switch"]["mean"] == pytest.approx(-0.05)
  assert manual["jump"]["mean"] == pytest.approx(0.25)
  assert results["adaptive_step_reaching_top1_per_layer"][0][:2] == [51, 51]
  seen = results["adaptive_first_choice_before_switch"]["seed1"]
  assert seen["steps"] == switch
  assert seen["share_of_steps_at_or_below_median_per_layer"] == [0, 0] + [1] * (layers - 2)
  # Layers 0-1 go from 2 to 1 at step 51 while their ceiling (start [4, 2], all top-1 by step
  # 90) is still 3 and 2: the rule's doing, not the ceiling's.
  assert results["adaptive_rule_driven_changes"]["seed0"] == [(51, 0, 2, 1), (51, 1, 2, 1)]
  shares = results["window_shares_at_or_above_calm_fraction"]["per_layer"]["seed1"]
  assert shares == [0, 0] + [1] * (layers - 2)


def test_rule_driven_changes_are_those_the_ceiling_does_not_explain(tmp_path):
  """A run whose k follows its ceiling exactly has no rule-driven change; one lowered early,
  raised back, then lowered by the ceiling, has exactly the first two."""
  base = get_config()
  base.train.steps, base.train.checkpoint_every = 100, 10
  layers = base.model.num_layers
  config = studies.variant_config(base, "ramp", str(tmp_path))
  schedule = model_and_schedule(config)[1]
  start = np.asarray(schedule.start)
  # deadline 90: layer 0's ceiling is 1 + ceil(3 (90 - s) / 90), 3 from s = 30, 2 from 60
  ceiling = np.stack([np.minimum(start, np.asarray(schedule.ceiling(n - 1)))
                      for n in range(1, 101)])
  assert ceiling[29, 0] == 4 and ceiling[30, 0] == 3 and ceiling[60, 0] == 2
  ramp = synthetic_run("ramp", config, list(range(1, 101)), top_k=ceiling)
  assert studies.analyses.rule_driven_changes(ramp) == []
  moved = ceiling.copy()
  moved[10:20, 0] = 3  # lowered at step 11, raised back at step 21
  moved[40:, 1] = 1  # layer 1 lowered at step 41 (its ceiling stays 2 until step 90)
  run = synthetic_run("adaptive_window", config, list(range(1, 101)), top_k=moved)
  assert studies.analyses.rule_driven_changes(run) == [(11, 0, 4, 3), (21, 0, 3, 4),
                                                       (41, 1, 2, 1)]


def test_paired_noise_pools_the_seed_spread_of_each_family(tmp_path):
  base = get_config()
  finals = {"lbl": (4.80, 4.90, 4.85), "phase1": (4.78, 4.86, 4.84),
            "top1_lbl": (4.81, 4.93, 4.85), "progressive": (4.79, 4.88, 4.85)}
  runs = {}
  for kind, values in finals.items():
    for seed, value in enumerate(values):
      name = kind + (f"_seed{seed}" if seed else "")
      runs[name] = synthetic_run(name, studies.variant_config(base, name, str(tmp_path)), [600],
                                 val_loss=[value])
  noise = studies.analyses.paired_noise(runs)
  branch, scratch = noise["branch"], noise["from_scratch"]
  assert branch["per_kind"]["progressive"]["per_seed"] == pytest.approx([0.01, 0.02, 0.01])
  assert branch["pooled_sd"] == pytest.approx(np.std([0.01, 0.02, 0.01], ddof=1))
  phase1_sd = np.std([-0.02, -0.04, -0.01], ddof=1)
  top1_sd = np.std([0.01, 0.03, 0.0], ddof=1)
  assert scratch["pooled_sd"] == pytest.approx(np.sqrt((phase1_sd ** 2 + top1_sd ** 2) / 2))
  assert scratch["bar"] == pytest.approx(2 * scratch["pooled_sd"])
  assert set(scratch["per_kind"]) == {"phase1", "top1_lbl"}  # kinds without runs left out


def test_transition_analysis_windows_and_shipped_runs(tmp_path):
  """Synthetic conversions with a known loss excess over phase 1 kept (0.05 while k is being
  lowered, 0.3 for 20 steps after the switch, 0.1 after that): the windows report exactly those;
  a run shipped (compacted, gzipped) and read back gives the compacted run's results."""
  base = get_config()
  base.train.steps, base.train.checkpoint_every = 100, 10
  layers = base.model.num_layers
  steps = np.arange(1, 101)
  lm = 5.0 - 0.01 * steps
  runs = {}
  for suffix in ("", "_seed1"):
    for name, loss, ks in (("lbl", lm, [1] * layers), ("phase1", lm - 0.05, [4, 2] + [1] * 6)):
      runs[name + suffix] = synthetic_run(
          name + suffix, studies.variant_config(base, name + suffix, str(tmp_path)), steps,
          lm_loss=loss, val_loss=loss, top_k=[ks] * 100, load_max_dev=np.ones((100, layers)),
          f=np.ones((100, layers, 4)))  # per-step f: dropped when shipped
    for name, (gradual, fraction) in studies.variants.TRANSITIONS.items():
      config = studies.variant_config(base, name + suffix, str(tmp_path))
      start, switch = config.train.init_step, int(round(fraction * 100))
      tail = steps[steps > start]
      excess = np.where(tail <= switch, 0.05, np.where(tail <= switch + 20, 0.3, 0.1))
      loss = lm[tail - 1] - 0.05 + excess
      runs[name + suffix] = synthetic_run(
          name + suffix, config, tail, lm_loss=loss, val_loss=loss,
          top_k=[[1] * layers] * len(tail), load_max_dev=np.full((len(tail), layers), 2.0))
  study = studies.STUDIES["transition"]
  results, figures = study.analyze(runs, str(tmp_path))
  assert all(os.path.getsize(path) > 10_000 for path in figures)
  gradual, abrupt = results["gradual50"], results["switch50"]
  assert gradual["seeds"] == 2 and gradual["switch_fraction"] == 0.5
  assert gradual["lm_loss_minus_keep"]["during_change"]["mean"] == pytest.approx(0.05)
  assert abrupt["lm_loss_minus_keep"]["during_change"]["mean"] == 0.0
  assert abrupt["lm_loss_minus_keep"]["first_20_after"]["mean"] == pytest.approx(0.3)
  assert abrupt["lm_loss_minus_keep"]["20_to_100_after"]["mean"] == pytest.approx(0.1)
  assert abrupt["final_val_minus_top1"]["mean"] == pytest.approx(0.05)
  assert abrupt["layer0_max_load_dev"]["20_before"]["mean"] == 1.0  # phase 1's steps
  assert abrupt["layer0_max_load_dev"]["first_20_after"]["mean"] == 2.0
  assert results["progressive"]["lm_loss_minus_keep"]["last_20"]["mean"] == pytest.approx(0.3)

  for name, run in runs.items():
    studies.write_shipped(studies.compact(run), str(tmp_path / f"{name}.json.gz"))
  shipped = {name: studies.read_shipped(str(tmp_path / f"{name}.json.gz")) for name in runs}
  assert "f" not in shipped["lbl"].records[1] and "lm_loss" in shipped["lbl"].records[1]
  again, _ = study.analyze(shipped, str(tmp_path))
  compacted, _ = study.analyze({n: studies.compact(r) for n, r in runs.items()}, str(tmp_path))
  assert json.dumps(again) == json.dumps(compacted)  # written and read back exactly
  assert again["switch50"]["lm_loss_minus_keep"]["first_20_after"]["mean"] == pytest.approx(
      0.3, abs=1e-5)  # within the 6 significant digits kept
  (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="not a shipped run"):
    studies.read_shipped(str(tmp_path / "broken.json.gz"))


def test_token_frequency_statistics_match_a_plain_loop():
  from experiments.token_frequency import layer_statistics
  rng = np.random.default_rng(4)
  experts, tokens = 6, rng.integers(0, 10, 500)
  choices = np.where(tokens == 0, 2, rng.integers(0, experts, 500))  # token 0 on expert 2
  frequent = [0, 1]
  got = layer_statistics(choices, tokens, frequent, experts)
  counts = [sum(1 for c in choices if c == e) for e in range(experts)]
  busiest = counts.index(max(counts))
  mine = [t for t, c in zip(tokens, choices) if c == busiest]
  rest = [sum(1 for t, c in zip(tokens, choices) if c == e and t not in frequent)
          for e in range(experts)]
  assert got["max_load_dev"] == pytest.approx(max(counts) / (500 / experts) - 1)
  assert got["frequent_share_of_top_expert"] == pytest.approx(
      sum(t in frequent for t in mine) / len(mine))
  assert got["top_expert_holds_of_frequent"] == pytest.approx(
      sum(t in frequent for t in mine) / sum(t in frequent for t in tokens))
  assert got["max_load_dev_without_frequent"] == pytest.approx(
      max(rest) / (sum(rest) / experts) - 1)
  assert got["most_frequent_token_on_one_expert"] == 1.0
  assert got["its_expert_load_rank"] == sorted(range(experts), key=lambda e: -counts[e]).index(2)


def test_token_frequency_first_choices_are_the_models_routing():
  """The first choices the analysis records, counted per expert, and its summed router
  probabilities equal what the model's own forward pass reports (a second code path)."""
  import types
  import jax.numpy as jnp
  from experiments.token_frequency import choice_fn
  from sigma_moe_jax import ModelConfig
  from sigma_moe_jax.layers import positions_from_segments
  from sigma_moe_jax.training import step as train_lib
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    num_experts=4, d_ff=32, top_k=1, capacity_factor=None)
  graphdef, params = train_lib.init_model(cfg, 3)
  run = types.SimpleNamespace(settings=types.SimpleNamespace(model=cfg), graphdef=graphdef,
                              params=params, top_k=jnp.ones(2, jnp.int32), selection_bias=None)
  tokens = np.random.default_rng(0).integers(1, 64, (2, 16)).astype(np.int32)
  segments = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
  batch = {"tokens": tokens, "segment_ids": segments,
           "positions": np.asarray(positions_from_segments(jnp.asarray(segments)))}
  choices, prob_sums = choice_fn(run)(batch)
  from flax import nnx
  _, stats = nnx.merge(graphdef, params)(jnp.asarray(tokens), jnp.asarray(segments),
                                          jnp.asarray(batch["positions"]))
  for layer in range(2):
    counted = np.bincount(choices[layer][segments > 0], minlength=4)
    np.testing.assert_array_equal(counted, np.asarray(stats.counts.first_choice[layer]))
    np.testing.assert_allclose(prob_sums[layer], stats.counts.gate_prob_sum[layer], rtol=1e-5)


def test_no_newline_corpus_is_the_corpus_without_line_breaks(tmp_path):
  """The token-frequency control's corpus: every piece of the configured corpus (cut as training
  cuts it), in order, each line break a space; the variant reads it."""
  from experiments.studies.domain_data import prepare_no_newline
  from sigma_moe_jax.data.pipeline import chunk_documents
  config = get_config()
  config.data.path = os.path.join(ROOT, config.data.path)
  path = prepare_no_newline(config, str(tmp_path))
  joined = load_documents(path)
  pieces = chunk_documents(load_documents(config.data.path), config.data.chunk_chars)
  assert joined == [p.replace("\n", " ") for p in pieces]
  assert not any("\n" in doc for doc in joined) and len(joined) > 100
  changed = studies.variant_config(get_config(), "no_newline", str(tmp_path))
  assert changed.data.path == path


def test_intervals_of_per_seed_bands():
  """The t interval against a hand computation (t(0.975, 2) = 4.3027: the drop-free converted
  minus top-1 differences give -0.086 to +0.118), and `with_intervals` keeps only the bands."""
  from experiments.studies.analyses import interval, with_intervals
  got = interval([0.03065, 0.04822, -0.03024])
  values = np.array([0.03065, 0.04822, -0.03024])
  half = 4.302652729911275 * values.std(ddof=1) / np.sqrt(3)
  assert (got["low"], got["high"]) == pytest.approx((values.mean() - half, values.mean() + half))
  assert (round(got["low"], 3), round(got["high"], 3)) == (-0.086, 0.118)
  results = with_intervals(lambda runs: {"a": {"per_seed": [1.0, 2.0, 4.0], "mean": 7.0},
                                         "b": {"c": {"per_seed": [None, 1.0]}, "d": 3.0}})({})
  assert set(results["intervals"]) == {"a"} and results["intervals"]["a"]["mean"] == 7 / 3


def test_early_drops_of_each_from_scratch_arm(tmp_path):
  """Drops over the first 10% of the steps and after, per seed, against NumPy; a branched run
  (progressive) has no first 10% of its own and is left out."""
  base = get_config()
  steps = np.arange(1, 601)
  runs, want = {}, {}
  for kind in ("lbl", "phase1", "progressive"):
    for seed in range(2):
      name = kind + (f"_seed{seed}" if seed else "")
      drops = np.random.default_rng(seed + len(kind)).random((600, 8))
      runs[name] = synthetic_run(name, studies.variant_config(base, name, str(tmp_path)), steps,
                                 drop_fraction=drops)
      want[name] = (drops[:60].mean(), drops[60:].mean())
  got = studies.analyses.with_early_drops(lambda runs: {"x": 1})(runs)
  assert got["x"] == 1 and set(got["early_drops"]) == {"lbl", "phase1"}
  for kind in ("lbl", "phase1"):
    names = [kind, kind + "_seed1"]
    assert got["early_drops"][kind]["first_10pct"]["per_seed"] == pytest.approx(
        [want[n][0] for n in names])
    assert got["early_drops"][kind]["after_10pct"]["per_seed"] == pytest.approx(
        [want[n][1] for n in names])


def test_depth_profile_statistics(tmp_path):
  """Per seed, the lowest quarter minus the rest and the least-squares slope of the second
  half's most loaded expert, against the closed forms; the bands' intervals over the seeds."""
  base = get_config()
  base.model.num_layers = 16
  steps, layers, experts = [50, 100], 16, base.model.num_experts
  runs, profiles = {}, []
  for seed in range(3):
    rng = np.random.default_rng(seed)
    max_dev = rng.random((2, layers)) * 3
    name = "deep" + (f"_seed{seed}" if seed else "")
    runs[name] = synthetic_run(
        name, studies.variant_config(base, name, str(tmp_path)), steps, val_load_max_dev=max_dev,
        val_load_min_dev=-max_dev / 3, val_lbl_per_layer=np.ones((2, layers)),
        val_load_cv=max_dev / 2, val_f=rng.dirichlet(np.ones(experts), (2, layers)),
        val_p=rng.dirichlet(np.ones(experts), (2, layers)),
        val_gate_prob_cv=np.full((2, layers), 0.1), val_loss=[5.0, 4.0 + seed],
        drop_fraction=np.zeros((2, layers)),
        val_tokens_per_expert=np.ones((2, layers, experts), int))
    profiles.append(max_dev.mean(0))  # both evaluations are in the second half
  results, figures = studies.STUDIES["depth_profile"].analyze(runs, str(tmp_path))
  x = np.arange(layers)
  want_gap = [p[:4].mean() - p[4:].mean() for p in profiles]
  want_slope = [np.sum((x - x.mean()) * (p - p.mean())) / np.sum((x - x.mean()) ** 2)
                for p in profiles]
  over = results["over_seeds"]
  assert over["lower_minus_rest"]["per_seed"] == pytest.approx(want_gap)
  assert over["slope_per_layer"]["per_seed"] == pytest.approx(want_slope)
  assert over["load_cv_lower_minus_rest"]["per_seed"] == pytest.approx(np.divide(want_gap, 2))
  assert results["intervals"]["over_seeds"]["slope_per_layer"]["mean"] == pytest.approx(
      np.mean(want_slope))
  assert results["early_drops"]["deep"]["after_10pct"]["mean"] == 0
  assert figures and os.path.getsize(figures[0]) > 10_000
