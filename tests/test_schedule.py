"""The per-layer top-k schedule: parsing, validation, and one compilation across a switch."""

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigma_moe_jax import ModelConfig, Transformer, TopKSchedule, count_params
from sigma_moe_jax.schedule import AdaptiveTopK, parse_per_layer


def test_compact_form_parses_like_python_would():
  assert parse_per_layer("[8,8,6,6,4,4,2,2]+[1]*48") == [8, 8, 6, 6, 4, 4, 2, 2] + [1] * 48
  assert parse_per_layer(" [2, 1] * 2 + [3] ") == [2, 1, 2, 1, 3]
  assert parse_per_layer([2, 2, 1]) == [2, 2, 1]


@pytest.mark.parametrize("bad", ["[1]*2; import os", "__import__('os')", "[1,]", "[a]*3",
                                 "[1]*-2", ""])
def test_compact_form_rejects_anything_else(bad):
  with pytest.raises(ValueError, match="cannot parse"):
    parse_per_layer(bad)


def test_phases_and_fractions():
  schedule = TopKSchedule.parse([(0, "[8,8,6,6,4,4,2,2]+[1]*48"), (0.9, "[1]*56")],
                                num_layers=56, total_steps=1000)
  assert schedule.starts == (0, 900)
  assert schedule.max_top_k == (8, 8, 6, 6, 4, 4, 2, 2) + (1,) * 48
  np.testing.assert_array_equal(schedule.top_k_at(899)[:9], [8, 8, 6, 6, 4, 4, 2, 2, 1])
  np.testing.assert_array_equal(schedule.top_k_at(900), [1] * 56)
  single = TopKSchedule.parse("[2]*4", num_layers=4)
  np.testing.assert_array_equal(single.top_k_at(10**6), [2] * 4)


@pytest.mark.parametrize("spec,match", [
    ("[1]*3", "3 per-layer entries, expected num_layers=4"),
    ("[0]*4", "must be >= 1"),
    ("[9]*4", "exceeds num_experts=8"),
    ([(0, "[1]*4"), (5, "[2]*4"), (3, "[1]*4")], "increase strictly"),
    ([(2, "[1]*4")], "first phase must start at step 0"),
    ([(0, "[1]*4"), (1.5, "[1]*4")], "outside"),
    ([(0, "[1]*4"), (-1, "[1]*4")], "start must be"),
])
def test_invalid_schedules_are_rejected(spec, match):
  with pytest.raises(ValueError, match=match):
    TopKSchedule.parse(spec, num_layers=4, total_steps=10, num_experts=8)


def test_switch_needs_no_recompilation():
  schedule = TopKSchedule.parse([(0, "[4,2]+[1]*2"), (3, "[1]*4")], num_layers=4)
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=4, num_heads=2, num_kv_heads=1,
                    num_experts=8, d_ff=16, top_k=1, max_top_k=schedule.max_top_k,
                    capacity_factor=2.0)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def forward(params, tokens, step):
    return nnx.merge(graphdef, params)(tokens, top_k=schedule.top_k_at(step))[1]

  tokens = jnp.ones((2, 8), jnp.int32)
  for step in range(6):
    stats = forward(params, tokens, step)
    want = np.asarray(schedule.top_k_at(step)) * tokens.size
    np.testing.assert_array_equal(stats.counts.tokens_per_expert.sum(-1), want)
  assert forward._cache_size() == 1


def test_phase1_activated_parameters():
  cfg = ModelConfig.sigma_moe_tiny()
  schedule = TopKSchedule.parse([(0, "[8,8,6,6,4,4,2,2]+[1]*48"), (0.9, "[1]*56")], 56, 100)
  phase1 = count_params(cfg, schedule.per_layer[0])["active"]
  target = count_params(cfg, schedule.final)["active"]
  assert 0.64e9 < phase1 < 0.66e9 and 0.53e9 < target < 0.54e9


def adaptive_reference(start, target, deadline, threshold, patience, smoothing, raise_above,
                       counts, calm_fraction=1.0):
  """The adaptive rule in plain Python, step by step: the k in force at every step. Each layer
  keeps the list of its ready flags since its last change; it lowers its k when that list is at
  least `patience` long and its last `patience` flags hold enough ready steps."""
  layers, experts = len(start), len(counts[0][0])
  needed = max(1, math.ceil(calm_fraction * patience - 1e-9))
  k, flags = list(start), [[] for _ in range(layers)]
  load = [[1.0 / experts] * experts for _ in range(layers)]
  history = []
  for step, step_counts in enumerate(counts):
    history.append(list(k))
    for l in range(layers):
      total = max(sum(step_counts[l]), 1)
      load[l] = [(1 - 1 / smoothing) * a + (1 / smoothing) * c / total
                 for a, c in zip(load[l], step_counts[l])]
    deviation = [max(a) * experts - 1 for a in load]
    typical = statistics.median(deviation)
    for l in range(layers):
      flags[l].append(deviation[l] <= typical + threshold)
      new = k[l]
      if (len(flags[l]) >= patience and sum(flags[l][-patience:]) >= needed
          and k[l] > target[l]):
        new -= 1
      elif deviation[l] > typical + raise_above and k[l] < start[l]:
        new += 1
      left = max(deadline - (step + 1), 0)
      new = min(new, target[l] + math.ceil((start[l] - target[l]) * left / deadline))
      if new != k[l]:
        flags[l] = []
      k[l] = new
  return history


def _adaptive_counts(steps, experts, seed=0):
  """A synthetic first-choice load sequence over four layers: layer 0 balanced, layer 1
  collapsing for a while (and going back up), layer 2 never settling (held only by the ceiling),
  layer 3 balanced at its target (it sets the median with layer 0)."""
  rng = np.random.default_rng(seed)
  balanced = lambda: rng.multinomial(256, np.full(experts, 1 / experts))
  collapsed = lambda: rng.multinomial(256, [0.65] + [0.05] * (experts - 1))
  return [[balanced(), collapsed() if 30 <= step < 60 else balanced(), collapsed(), balanced()]
          for step in range(steps)]


def _run_adaptive(schedule, counts, experts):
  update = jax.jit(schedule.update)
  state, got = schedule.init_state(experts), []
  for step in range(len(counts)):
    got.append(np.asarray(state["k"]).tolist())
    state = update(state, jnp.asarray(counts[step]), step + 1)
  assert update._cache_size() == 1
  return got


def test_adaptive_decisions_match_a_plain_python_rule():
  steps, experts = 120, 8
  counts = _adaptive_counts(steps, experts)
  params = dict(start=(4, 4, 3, 1), target=(1, 1, 1, 1), deadline=100, threshold=0.3,
                patience=6, smoothing=4, raise_above=1.5)
  got = _run_adaptive(AdaptiveTopK(**params), counts, experts)
  want = adaptive_reference(counts=[[c.tolist() for c in s] for s in counts], **params)
  assert got == want
  per_layer = np.asarray(got)
  assert per_layer[25, 0] == 1  # lowered early by the rule
  assert (np.diff(per_layer[:, 1]) > 0).any()  # layer 1 went back up during its collapse
  assert per_layer[100, 2] == 1 and per_layer[99, 2] == 2  # layer 2 followed the ceiling


def test_adaptive_window_counts_calm_steps_not_runs():
  """calm_fraction < 1: a layer ready in most but not all steps of its window is lowered, where
  the in-a-row rule (calm_fraction 1) never lowers it; both agree with the plain loop."""
  steps, experts, layers = 80, 4, 3
  rng = np.random.default_rng(1)
  balanced = lambda: rng.multinomial(400, np.full(experts, 1 / experts)).tolist()
  skewed = lambda p=0.6: rng.multinomial(400, [p] + [(1 - p) / 3] * 3).tolist()
  # Layer 0 is badly skewed one step in three (not ready then: above the median layer, layer
  # 2), ready at the other steps (balanced, at or below the median), so it is never
  # ready for 6 steps in a row but is ready in 2/3 of every window. Layers 1 and 2: balanced
  # and skewed throughout (the median sits between them).
  counts = [[skewed(0.9) if step % 3 == 0 else balanced(), balanced(), skewed()]
            for step in range(steps)]
  base = dict(start=(3, 1, 1), target=(1, 1, 1), deadline=1000, threshold=0.0, patience=6,
              smoothing=1, raise_above=10.0)
  for fraction in (1.0, 0.6):
    params = dict(base, calm_fraction=fraction)
    got = _run_adaptive(AdaptiveTopK(**params), counts, experts)
    assert got == adaptive_reference(counts=counts, **params), fraction
    layer0 = [k[0] for k in got]
    if fraction == 1.0:
      assert layer0 == [3] * steps
    else:
      # 4 ready steps in each full window of 6 (4 needed): 3 -> 2 -> 1, one step per window
      assert layer0[5] == 3 and layer0[6] == 2 and layer0[11] == 2 and layer0[12] == 1


def test_adaptive_config_errors_name_the_key():
  from sigma_moe_jax.training.run_config import make_config
  from sigma_moe_jax.training.settings import from_config
  config = make_config(ModelConfig(num_layers=2))
  config.schedule.kind = "adaptive"
  with pytest.raises(ValueError, match="schedule.top_k: an adaptive schedule needs"):
    from_config(config)
  config.schedule.top_k = "[2,2]"
  config.schedule.target = "[1,3]"
  with pytest.raises(ValueError, match="start >= target"):
    from_config(config)
  config.schedule.target = ""
  settings = from_config(config)
  assert settings.schedule.final == (1, 1) and settings.model.max_top_k == (2, 2)
  assert settings.schedule.deadline == round(0.7 * config.train.steps)
  config.schedule.calm_fraction = 1.5
  with pytest.raises(ValueError, match="schedule: adaptive top-k: calm_fraction must be in"):
    from_config(config)
