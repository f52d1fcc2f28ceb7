"""Grouped matmul, the core of dropless expert dispatch, with one kernel per platform.

  out = gmm(lhs [M, K], rhs [G, K, N], group_sizes [G], backend)   # [M, N]

Rows of `lhs` are sorted by group: group g owns the next group_sizes[g] rows and is multiplied by
rhs[g]. Rows past sum(group_sizes) are zero in the output and in every gradient, whatever the
kernel leaves there (the Pallas kernels leave them unwritten).

Backends (`ModelConfig.grouped_matmul`):
  xla         `jax.lax.ragged_dot`. XLA:CPU and XLA:GPU lower it densely (G times the work), so
              it is the CPU path and the test oracle.
  megablox    the Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.megablox.gmm`) with its own
              backward; interpreted when traced for a CPU (tests).
  mosaic_gpu  the Pallas Mosaic GPU kernels for Hopper: `ragged_dot_mgpu` forward and input
              gradient, `transposed_ragged_dot_mgpu` weight gradient, joined by a custom VJP.
  auto        megablox on TPU, mosaic_gpu on Hopper when the shapes and dtype suit it, xla on
              CPU; on other GPUs there is no kernel (`resolve` returns None) and the caller
              uses the capacity-padded dispatch rather than a dense lowering.
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sigma_moe_jax import platform

GROUPED_MATMULS = ("auto", "xla", "megablox", "mosaic_gpu")
_MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)
# Mosaic GPU tiles: (block_m, block_n, block_k, max_concurrent_steps, grid_block_n). Rows per tile
# matter most with many experts: a tile straddling a group boundary is computed once per group.
_MOSAIC_TILES = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
_MOSAIC_WGRAD_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                           grid_block_n=1)
_VMEM_BUDGET = 12 * 2**20  # bytes of a megablox tile set; the scoped VMEM limit is 16 MiB


def resolve(name: str, target: platform.Target, dtype, d_model: int,
            d_ff: int) -> Optional[str]:
  """The backend that runs the expert matmuls ([*, d_model] x [d_model, d_ff] and back), or None
  when `auto` finds no grouped-matmul kernel for the target."""
  if name not in GROUPED_MATMULS:
    raise ValueError(f"unknown grouped matmul {name!r}; expected one of {GROUPED_MATMULS}")
  if name != "auto":
    return name
  if target.platform == "tpu":
    return "megablox"
  if target.platform == "gpu":
    return "mosaic_gpu" if mosaic_gpu_applies(target, dtype, d_model, d_ff) else None
  return "xla"


def mosaic_gpu_applies(target: platform.Target, dtype, d_model: int, d_ff: int) -> bool:
  """Hopper, 16-bit operands, and both matmul widths a multiple of the 128-wide tiles."""
  return (target.compute_capability == platform.HOPPER
          and jnp.dtype(dtype) in [jnp.dtype(d) for d in _MOSAIC_DTYPES]
          and d_model % 128 == 0 and d_ff % 128 == 0)


def gmm(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"], group_sizes: Int[Array, "G"],
        backend: str) -> Float[Array, "M N"]:
  """lhs @ rhs[group of each row], in lhs's dtype (float32 accumulation); see the module doc."""
  group_sizes = group_sizes.astype(jnp.int32)
  if backend == "xla":
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    return _zero_tail(out, group_sizes)
  if backend == "megablox":
    return _megablox(lhs, rhs, group_sizes)
  if backend == "mosaic_gpu":
    return _mosaic_gpu(lhs, rhs, group_sizes)
  raise ValueError(f"unknown grouped matmul backend {backend!r}")


def _zero_tail(x, group_sizes):
  """Rows past sum(group_sizes) set to zero with a select (whose gradient is a select too, so an
  unwritten row, NaN in interpret mode, never reaches a gradient: 0 * NaN would)."""
  routed = jnp.arange(x.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)
  return jnp.where(routed[:, None], x, jnp.zeros((), x.dtype))


def _pad_rows(x, multiple: int):
  extra = -x.shape[0] % multiple
  return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


# TPU: megablox ------------------------------------------------------------------------------


def megablox_tiling(m: int, k: int, n: int, itemsize: int) -> Tuple[int, int, int]:
  """(tm, tk, tn) for megablox. Its backward reuses the tiling with k and n exchanged, so tk and
  tn are multiples of 128 (a TPU lane); tm is a multiple of 16 rows and m is padded to it. The
  tiles (double-buffered operands, float32 accumulator, output) stay within a VMEM budget."""
  round_up = lambda x, r: -(-x // r) * r
  tm, tk, tn = min(512, round_up(m, 16)), min(1024, round_up(k, 128)), min(1024, round_up(n, 128))

  def vmem(tm, tk, tn):
    return 2 * (tm * tk + tk * tn) * itemsize + tm * tn * 4 + 2 * tm * tn * itemsize
  while vmem(tm, tk, tn) > _VMEM_BUDGET and max(tk, tn) > 128:
    if tk >= tn:
      tk //= 2
    else:
      tn //= 2
  return tm, tk, tn


def _megablox(lhs, rhs, group_sizes):
  from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
  m, k = lhs.shape
  tiling = megablox_tiling(m, k, rhs.shape[2], jnp.dtype(lhs.dtype).itemsize)
  x = _zero_tail(_pad_rows(lhs, tiling[0]), group_sizes)
  out = megablox_gmm(x, rhs.astype(lhs.dtype), group_sizes, preferred_element_type=lhs.dtype,
                     tiling=tiling, interpret=platform.current().platform != "tpu")
  return _zero_tail(out, group_sizes)[:m]


# GPU: Mosaic GPU (Hopper) ---------------------------------------------------------------------


def _mosaic_gpu(lhs, rhs, group_sizes):
  m = lhs.shape[0]
  x = _pad_rows(lhs, _MOSAIC_TILES["block_m"])
  return _mosaic_gmm(x, rhs.astype(lhs.dtype), group_sizes)[:m]


@jax.custom_vjp
def _mosaic_gmm(lhs, rhs, group_sizes):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  out = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, **_MOSAIC_TILES)
  return _zero_tail(out, group_sizes)


def _mosaic_gmm_fwd(lhs, rhs, group_sizes):
  return _mosaic_gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _mosaic_gmm_bwd(residuals, d_out):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
  lhs, rhs, group_sizes = residuals
  # The weight-gradient kernel masks rows by multiplication: rows past the groups must be finite.
  d_out = _zero_tail(d_out.astype(lhs.dtype), group_sizes)
  lhs = _zero_tail(lhs, group_sizes)
  # d lhs = d_out @ rhs[g]^T: rhs read transposed in place, no copy of the weights.
  d_lhs = ragged_dot_mgpu.ragged_dot(d_out, rhs, group_sizes=group_sizes, transpose_rhs=True,
                                     **_MOSAIC_TILES)
  with _sm_count_for_export(transposed_ragged_dot_mgpu):
    d_rhs = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, d_out, group_sizes=group_sizes, **_MOSAIC_WGRAD_TILES)
  return _zero_tail(d_lhs, group_sizes), d_rhs.astype(rhs.dtype), None


_mosaic_gmm.defvjp(_mosaic_gmm_fwd, _mosaic_gmm_bwd)

_HOPPER_SMS = 132  # H100 / H200 SXM


@contextlib.contextmanager
def _sm_count_for_export(module):
  """The weight-gradient kernel sizes its grid from `jax.devices()[0].core_count` while tracing.
  On a host without a GPU (`jax.export` for cuda) that attribute is missing; the kernel module
  then sees a device list reporting a Hopper's SM count. On a GPU nothing changes."""
  if hasattr(jax.devices()[0], "core_count"):
    yield
    return
  proxy = types.ModuleType("jax")
  proxy.__getattr__ = lambda name: getattr(jax, name)
  proxy.devices = lambda *args, **kwargs: [types.SimpleNamespace(core_count=_HOPPER_SMS)]
  saved, module.jax = module.jax, proxy
  try:
    yield
  finally:
    module.jax = saved
