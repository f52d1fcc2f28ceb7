"""The expert-parallel MoE layer on 8 fake CPU devices against the same layer on one device, on
the same global batch (forward + backward), and the bytes the all_to_all moves per token.

  python -m benchmarks.expert_parallel

Fake devices share the same 2 cores, so the ratio measures the overhead of the exchange and of
the partitioned program, not a speed-up.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.common import time_interleaved  # noqa: E402
from sigma_moe_jax import sharding  # noqa: E402
from sigma_moe_jax.moe.expert_parallel import send_capacity  # noqa: E402
from sigma_moe_jax.moe.layer import MoE, MoEConfig  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--d_ff", type=int, default=256)
  parser.add_argument("--data", type=int, default=2)
  parser.add_argument("--expert", type=int, default=4)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--repeats", type=int, default=6)
  args = parser.parse_args()
  seqs = 8
  x = jax.random.normal(jax.random.key(0), (seqs, args.tokens // seqs, args.d_model))
  mask = jnp.ones(x.shape[:2], bool)
  moe = MoE(MoEConfig(args.d_model, args.d_ff, args.experts,
                      capacity_factor=args.capacity_factor, init_std=0.02), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(moe)

  def loss(params, x):
    y, stats = nnx.merge(graphdef, params)(x, jnp.int32(1), 1, mask)
    return jnp.sum(y) + stats.lbl

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  single = lambda: step(params, x)

  mesh = sharding.make_mesh(data=args.data, expert=args.expert)
  with jax.set_mesh(mesh):
    placed = jax.device_put(params, jax.tree.map(
        lambda a: NamedSharding(mesh, P("expert") if a.ndim == 3 else P()), params))
    x_sharded = jax.device_put(x, NamedSharding(mesh, sharding.batch_spec(mesh)))
    sharded_step = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def parallel():
      with jax.set_mesh(mesh):
        return sharded_step(placed, x_sharded)

    one, ep = time_interleaved([single, parallel], repeats=args.repeats)
  shards = args.data * args.expert
  local_tokens = args.tokens // shards
  rows = args.expert * send_capacity(local_tokens, args.expert, args.capacity_factor)
  sent = 2 * rows * (args.d_model * 4 + 4)  # activations there and back, plus expert ids
  payload = 2 * args.d_model * 4 * (args.expert - 1) / args.expert
  print(f"{args.tokens} tokens, {args.experts} experts top-1, d_model {args.d_model}, "
        f"d_ff {args.d_ff}, capacity factor {args.capacity_factor}, forward + backward")
  print(f"{'one device':32s} {one * 1e3:8.1f} ms   1.00x")
  print(f"{f'data {args.data} x expert {args.expert} (8 fake)':32s} {ep * 1e3:8.1f} ms   "
        f"{ep / one:.2f}x")
  print(f"all_to_all bytes per token (forward): {sent / local_tokens:.0f} sent with padding "
        f"and ids, {payload:.0f} payload leaving the device")


if __name__ == "__main__":
  main()
