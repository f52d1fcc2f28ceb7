"""Per-device memory of a training config on a mesh, from abstract shapes and shardings only.

  python -m experiments.memory_plan --config=experiments/configs/sigma_moe_tiny.py \
      --devices=64 --hbm_gb=95 --config.mesh.fsdp=8 --config.mesh.expert=8
  python -m experiments.memory_plan --config=experiments/configs/sigma_moe_tiny.py --table

Parameters are float32 master weights; AdamW keeps two float32 moments; gradients are float32.
Activations are an estimate: with remat, each layer's input is kept and one layer's working set
is live at a time; without remat every layer's working set is kept. Attention scores assume the
XLA implementation ([heads, seq, seq] per sequence); fused attention kernels need far less.
"""

import math

import jax
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from experiments import cli as cli_lib
from experiments.settings import model_and_schedule
from sigma_moe_jax import sharding
from sigma_moe_jax.params import abstract_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of devices of the mesh.")
_HBM = flags.DEFINE_float("hbm_gb", 80.0, "Memory per device, GB.")
_TABLE = flags.DEFINE_bool("table", False, "Print the plan for a set of common topologies.")
flags.mark_flag_as_required("config")

# (name, devices, GB per device, mesh sizes, global batch in sequences)
TOPOLOGIES = [
    ("64 x TPU v5p", 64, 95.0, dict(data=1, fsdp=8, expert=8, tensor=1), 256),
    ("8 x H100 80GB", 8, 80.0, dict(data=1, fsdp=1, expert=8, tensor=1), 8),
    ("2 x 8 x H100 80GB", 16, 80.0, dict(data=1, fsdp=2, expert=8, tensor=1), 16),
    ("1 x H100 80GB", 1, 80.0, dict(data=1, fsdp=1, expert=1, tensor=1), 1),
]

GB = 1e9


def plan(config, devices: int, mesh_sizes: dict, batch_size: int) -> dict:
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
  layer_working = (tokens * (2 * d + attn_width + max_top_k * (2 * d + 3 * f)) * act
                   + sequences * cfg.num_heads * seq * seq * act)
  logits = tokens * cfg.vocab_size * 4 / sizes["tensor"]
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
  rows = TOPOLOGIES if _TABLE.value else [
      ("this config", _DEVICES.value, _HBM.value, dict(config.mesh), config.train.batch_size)]
  for name, devices, hbm, mesh, batch in rows:
    print(describe(name, hbm, plan(config, devices, mesh, batch)))


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
