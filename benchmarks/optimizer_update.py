"""The optimizer's part of the train step alone, on a model's whole state, donated as the trainer
donates it: `make_optimizer`'s update with the step's non-finite guard as the train step runs it
(the moments kept inside the optimizer, the parameters selected after), against the guard as a
select between optax's new state and the old one after optax's own clip + AdamW, and against no
guard at all. Prints each one's median time and how many full-array copies XLA put in it.
With `--config`, also the whole train step of that run config as the trainer jits it (its mesh,
shardings and settings; `--capacity` overrides the model's capacity factor, `--layers` runs it
with the layer scan, unrolled, or both), with our optimizer and with optax's clip + AdamW plus
the select, all stepped in alternation.

  python -m benchmarks.optimizer_update [--shapes cpu_tiny,d512] [--repeats 12]
      [--config configs/cpu_tiny.py --capacity 4,2 --layers scan,unrolled]
"""

import argparse
import importlib.util
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.peer_train_step import SHAPES, model_config
from sigma_moe_jax.training import step as train_lib


def optax_adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0):
  """optax's own clip + AdamW with make_optimizer's settings (the state the step then selects)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                                 mask=train_lib.weight_decay_mask))


def variants(schedule):
  ours, theirs = train_lib.make_optimizer(schedule), optax_adamw(schedule)
  keep = lambda finite, new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  def kept_inside(params, state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    updates, state = ours.update(grads, state, params, finite=finite)
    return keep(finite, optax.apply_updates(params, updates), params), state

  def select_after(params, state, grads):
    finite = jnp.isfinite(optax.tree.norm(grads))
    updates, new_state = theirs.update(grads, state, params)
    return (keep(finite, optax.apply_updates(params, updates), params),
            keep(finite, new_state, state))

  def no_guard(params, state, grads):
    updates, state = theirs.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return {"moments kept inside (ours)": (kept_inside, ours),
          "select after optax's update": (select_after, theirs),
          "no guard": (no_guard, theirs)}


def train_step_comparison(config_path: str, capacity: float, repeats: int, layer_modes):
  """Median seconds of the trainer's jitted step for `config_path`, for each layer mode ("scan",
  "unrolled") with make_optimizer's optimizer ("ours") and with optax's clip + AdamW, whose state
  the step then keeps by a select; all stepped in alternation."""
  from sigma_moe_jax.infra import sharding
  from sigma_moe_jax.training import run
  spec = importlib.util.spec_from_file_location("run_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.capacity_factor = capacity
  workdir = tempfile.mkdtemp()
  built = run.build_training(config, workdir)
  begun = run.start(config, built, workdir, {**config.to_dict(), "fingerprint": ""})
  s, mesh, t = built.settings, built.mesh, built.settings.train
  theirs = optax_adamw(built.lr, t.b1, t.b2, t.weight_decay, t.grad_clip)
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh))
  batches = [{k: jax.make_array_from_process_local_data(batch_sharding, v)
              for k, v in next(begun.iterator).items()} for _ in range(8)]
  runs = {}
  for layers in layer_modes:
    cfg = s.model.replace(scan_layers=layers == "scan")
    for label, optimizer in (("ours", built.optimizer), ("optax + select", theirs)):
      step = train_lib.jit_train_step(train_lib.model_graphdef(cfg), optimizer, built.lr, cfg,
                                      s.balance, begun.shardings, mesh, schedule=s.schedule)
      runs[f"{layers}, {label}"] = [step, jax.tree.map(lambda a: a.copy(), begun.state), []]
  with jax.set_mesh(mesh):
    for i in range(repeats + 4):
      for record in runs.values():
        start = time.perf_counter()
        record[1], _ = record[0](record[1], batches[i % len(batches)])
        jax.block_until_ready(record[1])
        if i >= 4:
          record[2].append(time.perf_counter() - start)
  return {label: float(np.median(record[2])) for label, record in runs.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--repeats", type=int, default=12)
  parser.add_argument("--config", default="", help="a run config file: time its train step too")
  parser.add_argument("--capacity", default="4", help="capacity factors for --config")
  parser.add_argument("--layers", default="scan", help="layer modes for --config: scan,unrolled")
  args = parser.parse_args()
  schedule = train_lib.learning_rate_schedule(lr=1e-3, steps=10**6, warmup_steps=10, kind="wsd")
  for name in [n for n in args.shapes.split(",") if n]:
    _, params = train_lib.init_model(model_config(SHAPES[name]), 0)
    grads = jax.tree.map(lambda p: 0.01 * p + 1e-3, params)
    size = sum(p.size for p in jax.tree.leaves(params))
    runs, copies = {}, {}
    for label, (update, optimizer) in variants(schedule).items():
      step = jax.jit(update, donate_argnums=(0, 1))
      text = step.lower(params, optimizer.init(params), grads).compile().as_text()
      copies[label] = len(re.findall(r"\} copy\(", text))
      runs[label] = [step, (jax.tree.map(jnp.copy, params), optimizer.init(params))]

    def call(label):
      step, carried = runs[label]
      runs[label][1] = jax.block_until_ready(step(*carried, grads))
    times = {label: [] for label in runs}
    for label in runs:
      call(label), call(label)
    for _ in range(args.repeats):
      for label in runs:
        start = time.perf_counter()
        call(label)
        times[label].append(time.perf_counter() - start)
    print(f"{name}: {size / 1e6:.1f}M parameters, median of {args.repeats} alternating updates")
    for label in runs:
      print(f"  {label:30s} {np.median(times[label]) * 1e3:8.1f} ms  {copies[label]:3d} copies")
  for capacity in (args.config and args.capacity.split(",")) or ():
    modes = args.layers.split(",")
    seconds = train_step_comparison(args.config, float(capacity), 3 * args.repeats, modes)
    print(f"{args.config}, capacity {capacity}: the train step, median of {3 * args.repeats} "
          f"alternating steps")
    for label, value in seconds.items():
      print(f"  {label:30s} {value * 1e3:8.1f} ms")
    for layers in modes:
      print(f"  {layers}: optax + select / ours "
            f"{seconds[layers + ', optax + select'] / seconds[layers + ', ours']:.2f}x")


if __name__ == "__main__":
  main()
