"""`train(config, workdir) -> TrainState`: a whole run from its config. Builds the mesh, the data,
the state (fresh, resumed from the workdir's newest intact checkpoint, or started from another
run's), the jitted steps and the default hooks, then calls `fit`.

    from sigma_moe_jax import train
    state = train(get_config(), "runs/mine")  # a config: run_config.make_config, a config file

Nothing is started on a bad config: the error names the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.data.pipeline import check_vocab
from sigma_moe_jax.data.tokenizer import load_tokenizer
from sigma_moe_jax.inference import generate
from sigma_moe_jax.infra import distributed, sharding, storage
from sigma_moe_jax.infra.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from sigma_moe_jax.model import stacked
from sigma_moe_jax.moe.balancing import gate_prob_mean, load_statistics
from sigma_moe_jax.training import hooks as hooks_lib
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.checkpoint import Checkpointer, abstract_like
from sigma_moe_jax.training.inputs import Inputs, eval_batches, load_inputs, train_batches
from sigma_moe_jax.training.loop import fit
from sigma_moe_jax.training.resume import (check_compatible, fingerprint, restore_initial,
                                           restore_latest_intact, truncate_metrics)
from sigma_moe_jax.training.run_config import check_keys
from sigma_moe_jax.training.settings import Settings, TrainSettings, from_config, lr_and_optimizer


def check_batch_split(t: TrainSettings, batch_shards: int):
  if t.batch_size % (t.grad_accum * batch_shards):
    raise ValueError(f"train.batch_size {t.batch_size} does not split into train.grad_accum "
                     f"{t.grad_accum} micro-batches over the {batch_shards} batch shards of "
                     f"the mesh")
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size {t.batch_size} does not split over "
                     f"{jax.process_count()} processes")


class Training(NamedTuple):
  """What a run is made of, built from its config (shared by `train` and the studies)."""
  settings: Settings
  mesh: Any
  inputs: Inputs
  lr: Any
  optimizer: Any


def build_training(config, workdir: Optional[str] = None) -> Training:
  """Validates the config and builds everything but the data iterators and the jitted steps."""
  check_keys(config)
  settings = from_config(config)
  t = settings.train
  mesh = sharding.make_mesh(**dataclasses.asdict(settings.mesh))
  check_batch_split(t, math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh)))
  tokenizer = load_tokenizer(settings.data.tokenizer)
  check_vocab(tokenizer, settings.model.vocab_size)
  inputs = load_inputs(settings.data, t, tokenizer)
  lr, optimizer = lr_and_optimizer(t)
  if t.init_from and storage.resolve(t.init_from) == storage.resolve(workdir or ""):
    raise ValueError("train.init_from names the run's own workdir; a run resumes from its own "
                     "checkpoints without it")
  return Training(settings, mesh, inputs, lr, optimizer)


def dropless_eval_step(model_cfg: ModelConfig):
  """The evaluation step of the model without a capacity limit, whatever the training capacity:
  every evaluated token reaches its experts, so validation losses compare across capacity
  settings (the parameters are the same)."""
  return train_lib.make_eval_step(
      train_lib.model_graphdef(generate.inference_config(model_cfg)))


def evaluate(eval_step, params, batches, to_global, mesh, top_k, bias, max_batches: int):
  """Loss and routing load of up to `max_batches` batches: val_loss, val_ppl, val_targets,
  val_tokens_per_expert [layers, E] and the `load_statistics` of the summed counts
  (val_f, val_p, val_load_max_dev, ...)."""
  ce_sum, targets, total = 0.0, 0, None
  for i, batch in enumerate(batches):
    if i >= max_batches:
      break
    with jax.set_mesh(mesh):
      ce, n, counts = eval_step(params, to_global(batch), top_k, bias)
    counts = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(counts))
    ce_sum, targets = ce_sum + float(ce), targets + int(n)
    total = counts if total is None else jax.tree.map(np.add, total, counts)
  loss = ce_sum / max(targets, 1)
  result = {"val_loss": loss, "val_ppl": float(np.exp(loss)), "val_targets": targets}
  if targets:
    assignments = total.tokens_per_expert.astype(np.int64)
    result["val_tokens_per_expert"] = assignments
    result.update({f"val_{k}": np.asarray(v) for k, v in
                   load_statistics(assignments, gate_prob_mean(total)).items()})
    result["val_lbl"] = float(np.mean(result["val_lbl_per_layer"]))
    result["val_drop_fraction"] = total.dropped / np.maximum(assignments.sum(-1), 1)
  return result


def evaluator(built: Training, to_global):
  """state -> (values, text) over every eval set; the unnamed one logs as val_*, a named one as
  <name>_val_*."""
  s, mesh = built.settings, built.mesh
  eval_step = jax.jit(dropless_eval_step(s.model))
  batches = eval_batches(built.inputs, s.data, s.train)

  def evaluate_all(state):
    logged, parts = {}, []
    bias = state.selection_bias if s.balance.loss_free else None
    top_k = train_lib.top_k_in_force(state, s.model, s.schedule)
    for name, docs in built.inputs.eval_sets.items():
      result = evaluate(eval_step, state.params, batches(docs), to_global, mesh, top_k, bias,
                        s.train.eval_batches)
      prefix = f"{name}_" if name else ""
      logged.update({prefix + k: v for k, v in result.items()})
      parts.append(f"{prefix}val_loss {result['val_loss']:.4f} | {prefix}val_ppl "
                   f"{result['val_ppl']:.2f}")
    return logged, " | ".join(parts)
  return evaluate_all


class Start(NamedTuple):
  """Where a run begins: its state, the training iterator and the checkpointer of its workdir."""
  state: Any
  iterator: Any
  checkpointer: Checkpointer
  shardings: Any
  graphdef: Any


def start(config, built: Training, workdir: str, config_json: dict) -> Start:
  """A fresh state, the workdir's newest intact checkpoint, or `train.init_from`'s."""
  s = built.settings
  t = s.train
  graphdef, state, shardings = train_lib.init_sharded_state(s.model, t.seed, built.optimizer,
                                                            built.mesh, s.schedule)
  fresh_top_k = lambda step: jax.device_put(
      train_lib.init_top_k_state(s.model, s.schedule, step), shardings.top_k_state)

  def restore(checkpointer, step):
    # A fresh iterator per attempt: a failed restore may have set part of one.
    iterator = train_batches(built.inputs, s.data, t)
    return checkpointer.restore(step, abstract_like(state, shardings), iterator), iterator

  checkpointer, latest, restored = restore_latest_intact(
      lambda: Checkpointer(storage.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                           keep=t.keep_checkpoints, async_save=t.async_checkpointing),
      workdir, restore, lambda saved: check_compatible(saved, config_json))
  iterator = train_batches(built.inputs, s.data, t)
  if latest is not None:
    state, iterator = restored
    if state.top_k_state is None:  # a checkpoint from before the schedule had a state
      state = state._replace(top_k_state=fresh_top_k(int(state.step)))
    print(f"resumed from step {latest} in {workdir}", flush=True)
    if jax.process_index() == 0:
      truncate_metrics(workdir, latest)
  elif t.init_from:
    state = restore_initial(config, t, state, shardings, iterator)
    # The other run's schedule state is not this run's: an adaptive schedule begins afresh.
    state = state._replace(top_k_state=fresh_top_k(int(state.step)))
  return Start(state, iterator, checkpointer, shardings, graphdef)


def default_hooks(built: Training, begun: Start, workdir: str, config_json: dict, to_global,
                  extra: Sequence[Any] = ()) -> list:
  """Divergence, the log line, evaluation, then `extra` (what they record is written too), the
  metrics writer, checkpoints, preemption."""
  s = built.settings
  t = s.train
  divergence = hooks_lib.Divergence(t.max_bad_steps)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  checkpoints = hooks_lib.Checkpoints(begun.checkpointer, t.checkpoint_every, begun.iterator,
                                      config_json, before_save=[divergence.flush, writer.flush],
                                      last_saved=int(begun.state.step))
  write = hooks_lib.WriteMetrics(writer, checkpoints.completed_step)
  peak = (t.peak_flops or peak_flops_per_device()) * jax.device_count()
  log = hooks_lib.ThroughputLog(t.log_every, t.batch_size * t.seq_len,
                                lambda top_k: flops_per_token(s.model, t.seq_len, top_k), peak)
  evaluation = ([hooks_lib.Evaluate(t.eval_every, evaluator(built, to_global))]
                if built.inputs.eval_sets else [])
  return [divergence, log, *evaluation, *extra, write, checkpoints,
          hooks_lib.Preemption(checkpoints)]


def train(config, workdir: str, *, hooks: Sequence[Any] = ()) -> train_lib.TrainState:
  """Trains (or resumes) the run of `config` in `workdir` and returns the final state. `config`:
  an ml_collections ConfigDict (`run_config.make_config`, a config file's `get_config`) or a
  plain dict of sections; keys it lacks take their defaults. `hooks` run after
  the log line and evaluation and before the metrics are written (what they `log` is written
  with the rest). Raises ValueError naming the key on a bad config, and `RunStopped` when the
  run stops early (preemption, divergence, a failed write), saying what was kept."""
  if not isinstance(config, ml_collections.ConfigDict):  # a plain {section: {key: value}} dict
    config = ml_collections.ConfigDict(config)
  distributed.maybe_initialize()
  workdir = storage.resolve(workdir)
  built = build_training(config, workdir)
  problem = storage.check_writable(workdir)
  if problem:
    raise ValueError(f"cannot write to the workdir {workdir} ({problem}); nothing was started")
  s, mesh = built.settings, built.mesh
  if jax.process_index() == 0:
    more = [n for n in built.inputs.eval_sets if n]
    print(built.inputs.held_out + (f"; more sets: {', '.join(more)}" if more else ""), flush=True)
  data = s.data
  config_json = {**config.to_dict(), "fingerprint": fingerprint(
      data.tokenizer, data.chat_template if data.format == "chat" else "")}
  begun = start(config, built, workdir, config_json)
  state, shardings = train_lib.per_layer_state(s.model, begun.state, begun.shardings)
  begun = begun._replace(state=state, shardings=shardings)
  if int(begun.state.step) >= s.train.steps:
    print(f"already trained to step {int(begun.state.step)} (train.steps={s.train.steps}); "
          f"nothing to do")
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
  to_global = lambda batch: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                             for k, v in batch.items()}
  train_step = train_lib.jit_train_step(begun.graphdef, built.optimizer, built.lr, s.model,
                                        s.balance, begun.shardings, mesh, schedule=s.schedule,
                                        grad_accum=s.train.grad_accum)

  def step_fn(state, batch):
    with jax.set_mesh(mesh):
      return train_step(state, batch)

  run_hooks = default_hooks(built, begun, workdir, config_json, to_global, hooks)
  return stacked(fit(begun.state, step_fn, map(to_global, begun.iterator),
                     until=s.train.steps, hooks=run_hooks))
