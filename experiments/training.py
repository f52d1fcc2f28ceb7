"""Everything a training run does, built from its config; `experiments/train.py` is the
command-line entry point."""

import dataclasses
import logging
import math
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding

from experiments.configs.base import make_config
from experiments.resilience import (Divergence, Preemption, RunStopped, fingerprint,
                                    restore_latest_intact, resume_differences, truncate_metrics)
from experiments.settings import (SCHEDULE_DEFAULTS, Settings, TrainSettings, from_config,
                                  lr_and_optimizer)
from sigma_moe_jax import ModelConfig, TopKSchedule, chat, generate, sharding, storage
from sigma_moe_jax import train as train_lib
from sigma_moe_jax.balancing import load_statistics
from sigma_moe_jax.checkpoint import Checkpointer, abstract_like
from sigma_moe_jax.chat import ChatTemplate
from sigma_moe_jax.data import (check_vocab, chunk_documents, data_files,
                                holds_out_pieces, load_documents, make_block_pipeline,
                                make_chat_pipeline, make_file_pipeline, make_pipeline,
                                read_documents, split_documents,
                                validation_piece_chars)
from sigma_moe_jax.metrics import (MetricsWriter, flops_per_token, format_duration,
                                   peak_flops_per_device)
from sigma_moe_jax.tokenizer import load_tokenizer


def maybe_initialize_distributed():
  """Multi-host when the environment says so. JAX_COORDINATOR_ADDRESS (host:port),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the run explicitly; a multi-task SLURM job or a
  multi-host TPU slice is detected by `jax.distributed.initialize()` itself. Single-host runs
  skip it."""
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    # CPU processes exchange collectives over gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif (int(env.get("SLURM_NTASKS", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1):
    jax.distributed.initialize()


def check_config_keys(config):
  """Rejects keys that no part of the trainer reads (a misspelt key would silently do nothing)."""
  reference = make_config(ModelConfig())
  for section in config.keys():
    if section not in reference:
      raise ValueError(f"unknown config section {section!r}; known: {sorted(reference.keys())}")
    unknown = sorted(set(config[section].keys()) - set(reference[section].keys()))
    if unknown:
      raise ValueError(f"unknown config keys in {section}: {unknown}")


def model_differences(saved: dict, current: dict, skip=()) -> list:
  """The model.* keys of two config dicts that differ, as "model.k: checkpoint x, config y",
  leaving out the keys in `skip`. A key the checkpoint lacks (written before the field existed)
  counts as the field's default."""
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  saved_model = {**defaults, **saved["model"]}
  return [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {v!r}"
          for k, v in current["model"].items() if saved_model.get(k) != v and k not in skip]


def check_compatible(saved: dict, current: dict):
  """The model, the schedule, the data stream (paths, split, tokenizer content) and the batch
  geometry must match the checkpoint's."""
  diffs = model_differences(saved, current)
  # Checkpoints written before the key was named top_k hold it as "topk"; those written before
  # the other keys existed had their defaults.
  saved_schedule = dict(saved["schedule"])
  if "topk" in saved_schedule:
    saved_schedule["top_k"] = saved_schedule.pop("topk")
  saved_schedule = {**SCHEDULE_DEFAULTS, **saved_schedule}
  current_schedule = current["schedule"]
  if saved_schedule["kind"] == current_schedule.get("kind", "fixed") == "fixed":
    # The adaptive schedule's settings mean nothing to a fixed one.
    current_schedule = {k: current_schedule[k] for k in ("kind", "top_k")}
  diffs += [f"schedule.{k}: checkpoint {saved_schedule.get(k)!r}, config {v!r}"
            for k, v in current_schedule.items() if saved_schedule.get(k) != v]
  diffs += resume_differences(saved, current)
  if diffs:
    raise ValueError("the workdir holds a checkpoint from an incompatible config ("
                     + "; ".join(diffs) + "); use another --workdir")


def check_batch_split(t: TrainSettings, batch_shards: int):
  if t.batch_size % (t.grad_accum * batch_shards):
    raise ValueError(f"train.batch_size {t.batch_size} does not split into train.grad_accum "
                     f"{t.grad_accum} micro-batches over the {batch_shards} batch shards of "
                     f"the mesh")
  if t.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size {t.batch_size} does not split over "
                     f"{jax.process_count()} processes")


class Training(NamedTuple):
  """What a run is made of, built from its config (shared by the launcher and its tests)."""
  settings: Settings
  model_cfg: ModelConfig
  schedule: Optional[TopKSchedule]
  balance: train_lib.BalanceSettings
  mesh: Any
  tokenizer: Any
  train_docs: Optional[list]  # None with data.shard_files
  train_groups: Optional[list]  # with data.rows_by_path: the training documents of each path
  train_files: Optional[list]  # the files read lazily with data.shard_files, else None
  eval_sets: dict  # name -> documents; "" is the split held out from data.path
  lr: Any
  optimizer: Any
  held_out: str = ""  # what the validation split holds out, in words (said once at the start)


def parse_eval_sets(spec: str, read=load_documents) -> dict:
  """"name=paths;name=paths" -> {name: documents}: extra validation sets, each evaluated and
  logged under its own name (e.g. one per domain). Paths as in data.path; the files should hold
  text kept out of training."""
  sets = {}
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    name, sep, paths = part.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not paths.strip():
      raise ValueError(f"data.eval_sets: {part!r} is not name=paths (name an identifier)")
    if name in sets:
      raise ValueError(f"data.eval_sets: {name!r} given twice")
    sets[name] = read(paths.strip())
  return sets


def build_training(config, workdir: Optional[str] = None) -> Training:
  """Validates the config and builds everything but the data iterators and the jitted steps."""
  check_config_keys(config)
  settings = from_config(config)
  t, data = settings.train, settings.data
  model_cfg, schedule, balance = settings.model, settings.schedule, settings.balance
  mesh = sharding.make_mesh(**dataclasses.asdict(settings.mesh))
  check_batch_split(t, math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh)))
  tokenizer = load_tokenizer(data.tokenizer)
  check_vocab(tokenizer, model_cfg.vocab_size)
  train_files = train_groups = None
  pieces, piece_chars = [], validation_piece_chars(data.chunk_chars)
  read = load_documents
  if data.format == "chat":
    template = ChatTemplate.load(data.chat_template)
    read = lambda paths: chat.load_examples(data_files(paths), template, tokenizer,
                                            max_len=t.seq_len, truncate=data.truncate)
    train_docs, val_docs = split_documents(read(data.path), data.val_fraction, data.seed)
  elif data.shard_files:
    train_files, val_files = split_documents(data_files(data.path), data.val_fraction, data.seed)
    if len(train_files) < jax.process_count():
      raise ValueError(f"data.shard_files: {len(train_files)} training files for "
                       f"{jax.process_count()} processes; every process needs at least one")
    train_docs, val_docs = None, [doc for f in val_files for doc in read_documents(f)]
  else:
    paths = [p for p in data.path.split(",") if p.strip()] if data.rows_by_path else [data.path]
    if data.rows_by_path and len(paths) < 2:
      raise ValueError(f"data.rows_by_path needs several comma-separated paths in data.path, "
                       f"got {data.path!r}")
    train_groups, val_docs = [], []
    for path in paths:  # each path split on its own: every one keeps training documents
      docs = load_documents(path)
      if holds_out_pieces(len(docs), data.val_fraction):
        pieces.append(f"{path} ({len(docs)} document{'s' if len(docs) > 1 else ''})")
      train, val = split_documents(docs, data.val_fraction, data.seed, piece_chars)
      train_groups.append(chunk_documents(train, data.chunk_chars) if data.chunk_chars else train)
      val_docs += val
    train_docs = [d for group in train_groups for d in group]
    if data.rows_by_path and (t.batch_size // jax.process_count()) % len(paths):
      raise ValueError(f"data.rows_by_path: the {t.batch_size // jax.process_count()} rows of "
                       f"each process's batch do not split into {len(paths)} equal blocks, one "
                       f"per path")
    if not data.rows_by_path:
      train_groups = None
  eval_sets = {"": val_docs} if val_docs else {}
  if data.val_fraction == 0:
    held_out = "validation: off (data.val_fraction=0)"
  else:
    unit = "files' documents" if train_files else "pieces" if pieces else "documents"
    held_out = f"validation: {len(val_docs)} {unit} held out"
    if train_docs is not None and data.format != "chat":
      chars = sum(map(len, val_docs))
      share = chars / max(1, chars + sum(map(len, train_docs)))
      held_out += f" ({chars:,} characters, {share:.1%} of the text)"
    if pieces:
      held_out += (f"; too few documents to hold out whole ones in {', '.join(pieces)}: cut "
                   f"at line breaks into pieces of at most {piece_chars:,} characters")
  eval_sets.update(parse_eval_sets(data.eval_sets, read))
  lr, optimizer = lr_and_optimizer(t)
  for name, docs in eval_sets.items():
    if len(docs) < jax.process_count():
      where = f"data.eval_sets {name!r}" if name else "data.val_fraction"
      raise ValueError(f"{len(docs)} validation documents for {jax.process_count()} "
                       f"processes: give {where} more documents (or set it empty/0)")
  if t.init_from and storage.resolve(t.init_from) == storage.resolve(workdir or ""):
    raise ValueError("train.init_from names the run's own workdir; a run resumes from its own "
                     "checkpoints without it")
  return Training(settings, model_cfg, schedule, balance, mesh, tokenizer, train_docs,
                  train_groups, train_files, eval_sets, lr, optimizer, held_out)


# Keys of the model that parameters do not depend on: a run started from another's checkpoint
# may change them (context extension: a new RoPE base or scaling at a longer seq_len).
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_scaling_factor", "rope_original_len")


def restore_initial(config, t: TrainSettings, state, shardings, train_iter):
  """train.init_from: starts a new run from another run's checkpoint. With init_mode `continue`
  it takes the train state and the data position (the step carries on, so step-keyed schedules
  continue where the other run stood, e.g. a branch under a different top-k schedule); with
  `params` the parameters and the loss-free bias only (fine-tuning, context extension): the
  step, the optimizer and the data start afresh. The model must match, but for its RoPE keys."""
  directory = storage.join(storage.resolve(t.init_from), "checkpoints")
  if not storage.isdir(directory):
    raise ValueError(f"train.init_from: no checkpoints directory in {t.init_from!r}")
  source = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    steps = source.all_steps()
    step = steps[-1] if steps and t.init_step < 0 else t.init_step
    if step not in steps:
      raise ValueError(f"train.init_from: {t.init_from!r} has no checkpoint at step {step} "
                       f"(it has {steps})")
    saved = source.saved_config(step)
    diffs = model_differences(saved, config.to_dict(), skip=ROPE_KEYS)
    rope = [d for d in model_differences(saved, config.to_dict()) if d not in diffs]
    if diffs:
      raise ValueError(f"train.init_from {t.init_from!r} holds a different model ("
                       + "; ".join(diffs) + ")")
    if rope:
      print(f"train.init_from: RoPE changed ({'; '.join(rope)})", flush=True)
    if t.init_mode == "params":
      loaded = source.restore_state(step, abstract_like(state, shardings), params_only=True)
      state = state._replace(params=loaded.params, selection_bias=(
          state.selection_bias if loaded.selection_bias is None else loaded.selection_bias))
    elif source.has_data_position(step):
      state = source.restore(step, abstract_like(state, shardings), train_iter)
    else:  # an imported model: its state, and the data stream from its start
      state = source.restore_state(step, abstract_like(state, shardings))
  finally:
    source.close()
  print(f"initialized from step {step} of {t.init_from}"
        + (" (parameters only)" if t.init_mode == "params" else ""), flush=True)
  return state


def short_reason(error: Exception) -> str:
  """A storage error in a few words: the OS's reason when there is one (storage layers wrap it
  in long messages)."""
  text = " ".join(str(error).split())
  for reason in ("No space left on device", "Permission denied", "Read-only file system",
                 "Disk quota exceeded"):
    if reason in text:
      return reason
  return f"{type(error).__name__}: {text[:160]}"


def dropless_eval_step(model_cfg: ModelConfig):
  """The evaluation step of the model without a capacity limit, whatever the training capacity:
  every evaluated token reaches its experts, so validation losses compare across capacity
  settings (the parameters are the same)."""
  return train_lib.make_eval_step(
      train_lib.model_graphdef(generate.inference_config(model_cfg)))


def evaluate(eval_step, params, batches, to_global, mesh, top_k, bias, max_batches: int):
  """Loss and routing load of up to `max_batches` batches: val_loss, val_ppl, val_targets,
  val_tokens_per_expert [layers, E] and the `load_statistics` of the summed counts and mean gate
  probabilities (val_f, val_p, val_load_max_dev, ...)."""
  ce_sum, targets, counts, prob_sum, tokens, dropped = 0.0, 0, 0, 0, 0, 0
  for i, batch in enumerate(batches):
    if i >= max_batches:
      break
    with jax.set_mesh(mesh):
      ce, n, routing = eval_step(params, to_global(batch), top_k, bias)
    routing = jax.device_get(routing)
    ce_sum, targets = ce_sum + float(ce), targets + int(n)
    counts = counts + routing["tokens_per_expert"].astype(np.int64)
    prob_sum = prob_sum + routing["gate_prob_sum"].astype(np.float64)
    tokens = tokens + routing["num_tokens"].astype(np.int64)
    dropped = dropped + routing["dropped"].astype(np.int64)
  loss = ce_sum / max(targets, 1)
  result = {"val_loss": loss, "val_ppl": float(np.exp(loss)), "val_targets": targets}
  if targets:
    gate_prob_mean = prob_sum / np.maximum(tokens, 1)[:, None]
    result["val_tokens_per_expert"] = counts
    result.update({f"val_{k}": np.asarray(v) for k, v in
                   load_statistics(counts, gate_prob_mean).items()})
    result["val_lbl"] = float(np.mean(result["val_lbl_per_layer"]))
    result["val_drop_fraction"] = dropped / np.maximum(counts.sum(-1), 1)
  return result


def run(config, workdir: str):
  maybe_initialize_distributed()
  workdir = storage.resolve(workdir)
  built = build_training(config, workdir)
  problem = storage.check_writable(workdir)
  if problem:
    raise ValueError(f"cannot write to the workdir {workdir} ({problem}); nothing was started")
  t = built.settings.train
  model_cfg, schedule, balance, mesh = built.model_cfg, built.schedule, built.balance, built.mesh
  optimizer, lr = built.optimizer, built.lr
  local_batch = t.batch_size // jax.process_count()
  data = built.settings.data
  order_seed = data.seed if data.order_seed < 0 else data.order_seed
  pipeline = lambda docs, seed=data.seed, **kw: make_pipeline(
      docs, built.tokenizer, seq_len=t.seq_len, batch_size=local_batch, seed=seed,
      process_index=jax.process_index(), process_count=jax.process_count(), **kw)
  if data.format == "chat":
    pipeline = lambda examples, seed=data.seed, **kw: make_chat_pipeline(
        examples, seq_len=t.seq_len, batch_size=local_batch, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count(), **kw)
  if built.train_groups is not None:
    train_pipeline = lambda: make_block_pipeline(
        built.train_groups, built.tokenizer, seq_len=t.seq_len, batch_size=local_batch,
        seed=order_seed, process_index=jax.process_index(), process_count=jax.process_count())
  elif built.train_files is None:
    train_pipeline = lambda: pipeline(built.train_docs, seed=order_seed)
  else:
    train_pipeline = lambda: make_file_pipeline(
        built.train_files, built.tokenizer, seq_len=t.seq_len, batch_size=local_batch,
        seed=order_seed, process_index=jax.process_index(),
        process_count=jax.process_count(), chunk_chars=data.chunk_chars)
  train_iter = train_pipeline()
  if jax.process_index() == 0:
    print(built.held_out + (f"; more sets: {', '.join(n for n in built.eval_sets if n)}"
                            if any(built.eval_sets) else ""), flush=True)

  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
  graphdef, state, shardings = train_lib.init_sharded_state(model_cfg, t.seed, optimizer, mesh,
                                                            schedule)

  def top_k_state_from(step):
    """This run's schedule state as it begins at `step`."""
    fresh = train_lib.init_top_k_state(model_cfg, schedule, step)
    return jax.device_put(fresh, shardings.top_k_state)

  config_json = {**config.to_dict(), "fingerprint": fingerprint(
      data.tokenizer, data.chat_template if data.format == "chat" else "")}
  checkpoint_dir = storage.join(workdir, "checkpoints")
  new_checkpointer = lambda: Checkpointer(checkpoint_dir, save_every=t.checkpoint_every,
                                          keep=t.keep_checkpoints,
                                          async_save=t.async_checkpointing)

  def check(saved):
    check_compatible(saved, config_json)

  def restore(checkpointer, step):
    # A fresh iterator per attempt: a failed restore may have set part of one.
    iterator = train_pipeline()
    return checkpointer.restore(step, abstract_like(state, shardings), iterator), iterator

  def completed_step():
    steps = sorted(int(d) for d in storage.listdir(checkpoint_dir) if d.isdigit())
    return steps[-1] if steps else "none"

  checkpointer, latest, restored = restore_latest_intact(new_checkpointer, workdir, restore,
                                                         check)
  if latest is not None:
    state, train_iter = restored
    if state.top_k_state is None:  # a checkpoint from before the schedule had a state
      state = state._replace(top_k_state=top_k_state_from(int(state.step)))
    print(f"resumed from step {latest} in {workdir}", flush=True)
    if jax.process_index() == 0:
      truncate_metrics(workdir, latest)
  elif t.init_from:
    state = restore_initial(config, t, state, shardings, train_iter)
    # The other run's schedule state is not this run's: an adaptive schedule begins afresh.
    state = state._replace(top_k_state=top_k_state_from(int(state.step)))

  train_step = train_lib.jit_train_step(graphdef, optimizer, lr, model_cfg, balance, shardings,
                                        mesh, schedule=schedule, grad_accum=t.grad_accum)
  eval_step = jax.jit(dropless_eval_step(model_cfg))
  to_global = lambda batch: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                             for k, v in batch.items()}

  def evaluate_all(state, step):
    """Every eval set; the unnamed one logs as val_*, a named one as <name>_val_*."""
    logged, parts = {}, []
    bias = state.selection_bias if balance.loss_free else None
    top_k = train_lib.top_k_in_force(state, model_cfg, schedule)
    for name, docs in built.eval_sets.items():
      result = evaluate(eval_step, state.params, pipeline(docs, shuffle=False, repeat=False),
                        to_global, mesh, top_k, bias, t.eval_batches)
      prefix = f"{name}_" if name else ""
      logged.update({prefix + k: v for k, v in result.items()})
      parts.append(f"{prefix}val_loss {result['val_loss']:.4f} | {prefix}val_ppl "
                   f"{result['val_ppl']:.2f}")
    return logged, " | ".join(parts)

  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  peak = (t.peak_flops or peak_flops_per_device()) * jax.device_count()
  tokens_per_step = t.batch_size * t.seq_len
  step = int(state.step)
  if step >= t.steps:
    print(f"already trained to step {step} (train.steps={t.steps}); nothing to do")
  preemption, divergence = Preemption(), Divergence(t.max_bad_steps)
  last_saved = step

  def save(step, force=False, wait=False):
    """A checkpoint, or RunStopped naming the last complete one when writing fails (a full
    disk): Orbax writes into a temporary directory, so earlier checkpoints stay intact."""
    nonlocal last_saved
    writer.flush()  # metrics reach storage no later than the checkpoint that covers them
    try:
      if step != last_saved:
        checkpointer.save(step, state, train_iter, config_json, force=force)
        last_saved = step
      if wait:
        checkpointer.wait()
    except Exception as e:  # noqa: BLE001 -- whatever the storage raised, stop with one line
      # The failed background writes are not logged again when their tasks are collected.
      logging.getLogger("asyncio").setLevel(logging.CRITICAL)
      # With asynchronous saves the failure may be an earlier save's, reported here.
      raise RunStopped(f"a checkpoint save failed by step {step} ({short_reason(e)}); the last "
                       f"complete checkpoint is {completed_step()}", storage_failed=True) from None

  def metrics_failed(error):
    return RunStopped(f"writing the metrics failed by step {step} ({short_reason(error)}); the "
                      f"last complete checkpoint is {completed_step()}", storage_failed=True)

  # Rates and the ETA count from the end of the first step, which includes the compilation.
  steady_step, steady_time, interval_step, interval_time = None, None, step, None
  stopping = False
  try:
    while step < t.steps:
      batch = to_global(next(train_iter))
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch)
      step += 1
      divergence.observe(step, metrics)
      if steady_step is None:
        jax.block_until_ready(metrics)
        steady_step, steady_time = step, time.perf_counter()
        interval_step, interval_time = step, steady_time
      logged = {}
      line = None
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rate_steps, rate_time = ((step - interval_step, now - interval_time)
                                 if step > interval_step else (1, now - interval_time))
        tokens_per_sec = rate_steps * tokens_per_step / max(rate_time, 1e-9)
        mfu = tokens_per_sec * flops_per_token(model_cfg, t.seq_len, metrics["top_k"]) / peak
        eta = ((t.steps - step) * (now - steady_time) / (step - steady_step)
               if step > steady_step else None)
        interval_step, interval_time = step, now
        logged = {**metrics, "tokens_per_sec": tokens_per_sec, "mfu": mfu}
        line = (f"step {step}/{t.steps} | loss {metrics['loss']:.4f} | lm "
                f"{metrics['lm_loss']:.4f} | lbl {metrics['lbl']:.4f} | lr {metrics['lr']:.2e} | "
                f"gnorm {metrics['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s | MFU {mfu:.1%} | "
                f"max load L0 {metrics['load_max_dev'][0]:+.2f} | dropped "
                f"{np.max(metrics['drop_fraction']):.1%} (worst layer) | ETA "
                f"{format_duration(eta) if eta is not None else '-'}")
      if built.eval_sets and (step % t.eval_every == 0 or step == t.steps):
        val, text = evaluate_all(state, step)
        logged.update(val)
        line = (line + " | " if line else f"step {step}/{t.steps} | ") + text
      if logged:
        try:
          writer.write(step, logged, line)
        except OSError as e:  # a full disk may hit the metrics before a checkpoint
          raise metrics_failed(e) from None
      if step % t.checkpoint_every == 0:
        divergence.flush()  # never save a step whose check is pending
        save(step)
      if step < t.steps and preemption.requested():
        divergence.flush()
        save(step, force=True, wait=True)
        raise RunStopped(f"stopped by {preemption.reason()} at step {step}; checkpoint "
                         f"{step} saved, run the same command to resume")
    divergence.flush()
    save(step, force=True, wait=True)  # the final step, unless saved already; then wait
  except RunStopped as stopped:
    stopping = True
    # After a failed save, closing the checkpointer would wait on the storage layer's pending
    # writes, whose callbacks then fail noisily; the process exits instead (see train.py).
    if not stopped.storage_failed:
      checkpointer.close()
    raise
  else:
    checkpointer.close()
  finally:
    preemption.restore()
    try:
      writer.close()
    except OSError as e:
      # When the run is already stopping, its own message stands; else this one is the reason.
      if not stopping:
        raise metrics_failed(e) from None

