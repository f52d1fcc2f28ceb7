"""Per-device memory of a training config on a mesh, from abstract shapes and shardings only.

  python -m sigma_moe_jax.cli.memory_plan --config=configs/sigma_moe_tiny.py \
      --devices=64 --hbm_gb=95 --config.mesh.fsdp=8 --config.mesh.expert=8
  python -m sigma_moe_jax.cli.memory_plan --config=configs/sigma_moe_tiny.py --table

  python -m sigma_moe_jax.cli.memory_plan --config=configs/sigma_moe_tiny.py \
      --topology=v5p:4x4x4

Parameters are float32 master weights; AdamW keeps two float32 moments; gradients are float32.
Activations are an estimate: with remat, each layer's input is kept and one layer's working set
is live at a time; without remat every layer's working set is kept. Attention scores
([heads, seq, seq] per sequence) are counted where the platform runs XLA attention; the fused
kernels (splash on TPU, cuDNN on Hopper) keep O(seq) per head. With --topology the estimate is
printed beside XLA's own per-device figures for the compiled train step
(sigma_moe_jax.cli.compile_check; needs libtpu).
"""

import dataclasses
import math

import jax
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from sigma_moe_jax import attention
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import aot, platform, sharding
from sigma_moe_jax.params import abstract_model
from sigma_moe_jax.training.settings import from_config, model_and_schedule, step_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of devices of the mesh.")
_HBM = flags.DEFINE_float("hbm_gb", 80.0, "Memory per device, GB.")
_TABLE = flags.DEFINE_bool("table", False, "Print the plan for a set of common topologies.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology (e.g. v5p:4x4x4): compile "
                                "the step for it and print XLA's memory beside the estimate.")
flags.mark_flag_as_required("config")

# (name, devices, GB per device, mesh sizes, global batch in sequences, target)
TOPOLOGIES = [
    ("64 x TPU v5p", 64, 95.0, dict(data=1, fsdp=8, expert=8, tensor=1), 1024,
     platform.Target("tpu")),
    ("8 x H100 80GB", 8, 80.0, dict(data=1, fsdp=1, expert=8, tensor=1), 8,
     platform.Target("gpu", platform.HOPPER)),
    ("2 x 8 x H100 80GB", 16, 80.0, dict(data=1, fsdp=2, expert=8, tensor=1), 16,
     platform.Target("gpu", platform.HOPPER)),
    ("1 x H100 80GB", 1, 80.0, dict(data=1, fsdp=1, expert=1, tensor=1), 1,
     platform.Target("gpu", platform.HOPPER)),
]

GB = 1e9


def plan(config, devices: int, mesh_sizes: dict, batch_size: int,
         target: platform.Target = platform.Target("tpu")) -> dict:
  cfg, _ = model_and_schedule(config)
  sizes = dict(mesh_sizes)
  free = [k for k, v in sizes.items() if v == -1]
  if free:
    sizes[free[0]] = devices // math.prod(v for v in sizes.values() if v != -1)
  if math.prod(sizes.values()) != devices:
    raise ValueError(f"mesh {sizes} does not have {devices} devices")
  mesh = AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  params = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
  specs = sharding.param_specs(params, mesh)
  param_bytes = 0
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    split = math.prod(sizes[a] for a in spec if a is not None)
    param_bytes += math.prod(leaf.shape) * 4 / split
  batch_shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
  seq = config.train.seq_len
  sequences = max(batch_size // (batch_shards * config.train.grad_accum), 1)
  tokens = sequences * seq
  act = np.dtype(cfg.dtype).itemsize
  d, f, layers = cfg.d_model, cfg.d_ff, cfg.num_layers
  attn_width = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.resolved_head_dim
  max_top_k = max(cfg.max_top_k_per_layer)
  fused = attention.resolve(cfg.attention, target, cfg.dtype, seq,
                            cfg.resolved_head_dim) != "xla"
  scores = 0 if fused else sequences * cfg.num_heads * seq * seq * act
  layer_working = tokens * (2 * d + attn_width + max_top_k * (2 * d + 3 * f)) * act + scores
  # float32 logits and their gradient, both [tokens, vocab] (XLA keeps the two live at once).
  logits = 2 * tokens * cfg.vocab_size * 4 / sizes["tensor"]
  if cfg.remat == "none":
    activations = layers * layer_working + logits
  else:
    activations = layers * tokens * d * act + layer_working + logits
  total = 4 * param_bytes + activations  # params + two moments + gradients
  return dict(mesh=sizes, params=param_bytes, optimizer=2 * param_bytes, grads=param_bytes,
              activations=activations, total=total, sequences=sequences)


def describe(name, hbm, result) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in result["mesh"].items() if v > 1) or "1 device"
  fits = "fits" if result["total"] <= 0.9 * hbm * GB else "does not fit"
  return (f"| {name} | {mesh} | {result['sequences']} | {result['params'] / GB:.1f} | "
          f"{result['optimizer'] / GB:.1f} | {result['grads'] / GB:.1f} | "
          f"{result['activations'] / GB:.1f} | {result['total'] / GB:.1f} of {hbm:.0f} | "
          f"{fits} |")


def main(argv):
  del argv
  config = _CONFIG.value
  print(f"per-device GB, seq_len {config.train.seq_len}, remat {config.model.remat}, "
        f"compute {config.model.dtype}; fits = total under 90% of the device memory")
  print("| topology | mesh | sequences per device | params | AdamW | grads | activations | "
        "total | verdict |")
  print("|---|---|---|---|---|---|---|---|---|")
  if _TOPOLOGY.value:
    compare_with_xla(config, _TOPOLOGY.value)
    return
  rows = TOPOLOGIES if _TABLE.value else [
      ("this config", _DEVICES.value, _HBM.value, dict(config.mesh), config.train.batch_size,
       platform.Target("tpu"))]
  for name, devices, hbm, mesh, batch, target in rows:
    print(describe(name, hbm, plan(config, devices, mesh, batch, target)))


def compare_with_xla(config, topology: str) -> None:
  """The estimate beside XLA's per-device figures for the same config on a TPU topology."""
  settings = from_config(config)
  devices = aot.tpu_devices(topology)
  mesh = sharding.make_mesh(**dataclasses.asdict(settings.mesh), devices=devices)
  hbm = aot.HBM_BYTES.get(devices[0].device_kind, _HBM.value * GB) / GB
  estimate = plan(config, len(devices), dict(mesh.shape), config.train.batch_size)
  print(describe(f"{topology} (estimate)", hbm, estimate))
  report = aot.compile_train_step(step_plan(settings), mesh)
  m = report.memory
  print(f"XLA, per device (GB): arguments (state and batch) {m['arguments'] / GB:.1f} against "
        f"an estimated {(estimate['params'] + estimate['optimizer']) / GB:.1f} for parameters "
        f"and AdamW; temporaries {m['temporaries'] / GB:.1f} against an estimated "
        f"{(estimate['grads'] + estimate['activations']) / GB:.1f} for gradients and "
        f"activations; total {m['total'] / GB:.1f} against {estimate['total'] / GB:.1f} "
        f"(compiled in {report.compile_seconds:.0f} s)")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
