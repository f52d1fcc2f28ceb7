"""The memory plan's per-device parameter bytes against real sharded arrays on 8 devices."""

import math

import jax

from sigma_moe_jax.cli import memory_plan
from configs import cpu_tiny
from sigma_moe_jax import ModelConfig
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.training import step as train_lib


def test_parameter_bytes_match_the_shards_of_real_arrays():
  config = cpu_tiny.get_config()
  mesh_sizes = dict(data=1, fsdp=2, expert=2, tensor=2)
  result = memory_plan.plan(config, 8, mesh_sizes, batch_size=8)
  mesh = sharding.make_mesh(**mesh_sizes)
  _, params = train_lib.init_model(ModelConfig(**config.model), 0)
  placed = jax.device_put(params, sharding.param_shardings(params, mesh))
  per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(placed))
  assert result["params"] == per_device
  assert result["optimizer"] == 2 * per_device and result["grads"] == per_device
  total = sum(math.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(params))
  assert per_device < total / 4  # experts over expert, d_model over fsdp, d_ff over tensor
