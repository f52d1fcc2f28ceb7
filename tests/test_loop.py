"""The library's training loop: `fit` with hooks against a plain loop, and `train` from Python."""

import json

import jax
import numpy as np
import pytest

from sigma_moe_jax import ModelConfig, fit, train
from sigma_moe_jax.model import has_layers
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.hooks import RunStopped
from sigma_moe_jax.training.loop import Hook
from sigma_moe_jax.training.run_config import make_config


class Counter:
  """A toy state: fit only needs `.step`."""

  def __init__(self, step=0, total=0):
    self.step, self.total = step, total


def add(state, batch):
  return Counter(state.step + 1, state.total + batch), {"batch": batch}


class Record(Hook):
  def __init__(self, log):
    self.log = log

  def after_step(self, end):
    self.log.append(("step", end.step, end.metrics["batch"], end.every(2)))

  def at_end(self, end):
    self.log.append(("end", end.step))

  def close(self, error):
    self.log.append(("close", type(error).__name__ if error else None))


def test_fit_calls_the_hooks_in_order_and_stops_at_until_or_when_batches_run_out():
  log = []
  state = fit(Counter(step=1), add, iter([10, 20, 30, 40]), until=3, hooks=[Record(log)])
  assert (state.step, state.total) == (3, 30)  # two steps: 1 -> 3
  assert log == [("step", 2, 10, True), ("step", 3, 20, True), ("end", 3), ("close", None)]
  log.clear()
  state = fit(Counter(), add, [5, 6], until=10, hooks=[Record(log)])
  assert (state.step, state.total) == (2, 11)
  assert log[-2:] == [("end", 2), ("close", None)]


def test_a_hook_that_raises_stops_the_loop_and_every_hook_still_closes():
  class Stop(Hook):
    def after_step(self, end):
      if end.step == 2:
        raise RunStopped("enough")

  first, last = [], []
  with pytest.raises(RunStopped, match="enough"):
    fit(Counter(), add, iter(range(100)), until=50, hooks=[Record(first), Stop(), Record(last)])
  assert [e for e in first if e[0] == "step"] == [("step", 1, 0, False), ("step", 2, 1, True)]
  assert ("end", 2) not in first
  assert first[-1] == last[-1] == ("close", "RunStopped")


CFG = ModelConfig(vocab_size=4096, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=4, d_ff=32, top_k=1, capacity_factor=4.0)


def test_fit_over_an_in_memory_iterator_matches_a_plain_loop():
  graphdef, params = train_lib.init_model(CFG, 0)
  lr = train_lib.learning_rate_schedule(lr=1e-2, steps=10, warmup_steps=1, kind="cosine")
  optimizer = train_lib.make_optimizer(lr)
  step_fn = jax.jit(train_lib.make_train_step(graphdef, optimizer, lr, CFG,
                                              train_lib.BalanceSettings()))
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, CFG.vocab_size, (2, 16), dtype=np.int32),
              "segment_ids": np.ones((2, 16), np.int32),
              "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))} for _ in range(3)]
  losses = []

  class Losses(Hook):
    def after_step(self, end):
      losses.append(float(end.metrics["loss"]))

  state = fit(train_lib.init_state(params, optimizer, CFG), step_fn, iter(batches), until=3,
              hooks=[Losses()])
  want, want_losses = train_lib.init_state(params, optimizer, CFG), []
  for batch in batches:
    want, metrics = step_fn(want, batch)
    want_losses.append(float(metrics["loss"]))
  assert int(state.step) == 3 and losses == want_losses
  jax.tree.map(np.testing.assert_array_equal, state.params, want.params)


def test_train_from_python_returns_the_state_it_saved(tmp_path, capsys):
  """With the layers unrolled, the run holds their parameters per layer (`per_layer_state`); what
  it saves and returns is stacked, and a resume (with the layer scan) reads it back."""
  config = make_config(CFG.replace(scan_layers=False))
  config.train.update(steps=4, batch_size=8, seq_len=32, warmup_steps=1, log_every=2,
                      eval_every=4, eval_batches=1, checkpoint_every=2, async_checkpointing=False)
  seen = []

  class Custom(Hook):
    def after_step(self, end):
      seen.append(end.step)
      if end.every(2):
        end.log({"custom": end.step * 10}, f"custom {end.step * 10}")

  state = train(config, str(tmp_path), hooks=[Custom()])
  assert int(state.step) == 4 and seen == [1, 2, 3, 4]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["custom"]) for r in records] == [(2, 20), (4, 40)]
  assert "val_loss" in records[-1] and "loss" in records[0]
  assert "step 4/4 | loss" in capsys.readouterr().out
  assert state.params["blocks"]["attn"]["wq"].shape[0] == CFG.num_layers
  assert state.opt_state[1][0].mu["blocks"]["attn"]["wq"].shape[0] == CFG.num_layers
  assert not has_layers(state)
  config.model.scan_layers = True
  again = train(config, str(tmp_path))  # resumes from the final checkpoint; nothing to do
  assert "already trained to step 4" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
               jax.device_get(state.params))
