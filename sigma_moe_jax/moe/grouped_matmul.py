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
  triton      our Pallas Triton kernels for any NVIDIA GPU from Ampere on (A100, A6000, L4, RTX
              30xx/40xx, and Hopper where Mosaic GPU does not apply): a grouped matmul over a tile
              schedule (forward and input gradient) and a per-group transposed matmul (weight
              gradient), joined by a custom VJP; interpreted when traced for a CPU (tests).
  auto        megablox on TPU; on a GPU mosaic_gpu on Hopper when the shapes and dtype suit it,
              else triton where it applies; xla on CPU. Where no kernel applies (a GPU before
              Ampere, widths not a multiple of 16) `resolve` returns None and the caller uses the
              capacity-padded dispatch rather than XLA's dense lowering of `ragged_dot`.

Why a kernel of our own for non-Hopper GPUs: tokamax 0.0.12's Triton `ragged_dot` compiles for an
A100 on this host, but cannot run in Pallas interpret mode with jax 0.10.2 (its bounds checks call
`program_id` inside `pl.when`), so its values could not be checked anywhere we test; ours is checked
in interpret mode against `lax.ragged_dot` (tests/test_kernels.py) and compiled for GPU targets.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sigma_moe_jax.infra import platform

GROUPED_MATMULS = ("auto", "xla", "megablox", "mosaic_gpu", "triton")
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
    if mosaic_gpu_applies(target, dtype, d_model, d_ff):
      return "mosaic_gpu"
    return "triton" if triton_applies(target, d_model, d_ff) else None
  return "xla"


def mosaic_gpu_applies(target: platform.Target, dtype, d_model: int, d_ff: int) -> bool:
  """Hopper, 16-bit operands, and both matmul widths a multiple of the 128-wide tiles."""
  return (target.compute_capability == platform.HOPPER
          and jnp.dtype(dtype) in [jnp.dtype(d) for d in _MOSAIC_DTYPES]
          and d_model % 128 == 0 and d_ff % 128 == 0)


def triton_applies(target: platform.Target, d_model: int, d_ff: int) -> bool:
  """Ampere or newer (Triton's tensor-core dot), both widths a multiple of the 16-wide tiles."""
  capability = target.compute_capability
  return (capability is not None and float(capability) >= 8.0
          and d_model % 16 == 0 and d_ff % 16 == 0)


def gmm(lhs: Float[Array, "M I"], rhs: Float[Array, "G I O"], group_sizes: Int[Array, "G"],
        backend: str) -> Float[Array, "M O"]:
  """lhs @ rhs[group of each row], in lhs's dtype (float32 accumulation); see the module doc."""
  group_sizes = group_sizes.astype(jnp.int32)
  if backend == "xla":
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    return _zero_tail(out, group_sizes)
  if backend == "megablox":
    return _megablox(lhs, rhs, group_sizes)
  if backend == "mosaic_gpu":
    return _mosaic_gpu(lhs, rhs, group_sizes)
  if backend == "triton":
    return _zero_tail(_triton_gmm(lhs, rhs.astype(lhs.dtype), group_sizes), group_sizes)
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
  """The weight-gradient kernel sizes its grid from `jax.devices()[0].core_count` while tracing,
  the host's device. Compiled for other devices (compile-only GPUs, `jax.export`), the kernel
  module sees a device list reporting the target's SM count (a Hopper's where it is unknown).
  On the GPU it is built for, nothing changes."""
  target = platform.current()
  host = jax.devices()[0]
  if host.platform == "gpu" and getattr(host, "core_count", None) == target.core_count:
    yield
    return
  proxy = types.ModuleType("jax")
  proxy.__getattr__ = lambda name: getattr(jax, name)
  cores = target.core_count or _HOPPER_SMS
  proxy.devices = lambda *args, **kwargs: [types.SimpleNamespace(core_count=cores)]
  saved, module.jax = module.jax, proxy
  try:
    yield
  finally:
    module.jax = saved


# GPU: Pallas Triton (Ampere and newer) --------------------------------------------------------

_TRITON_BLOCK_M = 64  # rows per tile: a tile straddling a group boundary is visited once per group


def _triton_params(dtype) -> Tuple[int, object]:
  """(largest K tile, compiler params). Shared memory per stage is (block_m x block_k + block_k x
  block_n) operands: 16-bit with 3 stages and 32-bit with 2 stay under 100 KB (an Ada SM's
  opt-in limit; an A100's is 163 KB)."""
  from jax.experimental.pallas import triton as pl_triton
  wide = jnp.dtype(dtype).itemsize > 2
  return (32 if wide else 64), pl_triton.CompilerParams(num_warps=4, num_stages=2 if wide else 3)


def _tile(dim: int, largest: int) -> int:
  return next(t for t in (128, 64, 32, 16) if t <= largest and dim % t == 0)


def tile_schedule(group_sizes: Int[Array, "G"], rows: int, block_m: int):
  """The visits of the forward kernel: (tile, group, first row, end row) per visit, int32 [V].

  Rows are sorted by group; group g covers rows [start_g, end_g). It is visited once for each
  block_m-row tile it overlaps, so a tile shared by groups is visited once per group and each
  visit writes only its group's rows. V = rows / block_m + G bounds the visits; visits past the
  real ones get an empty row range and write nothing.
  """
  groups = group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first = starts // block_m
  visits = jnp.where(group_sizes > 0, -(-ends // block_m) - first, 0)
  last_visit = jnp.cumsum(visits)
  v = jnp.arange(rows // block_m + groups, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(last_visit, v, side="right"), groups - 1)
  real = v < last_visit[-1]
  tile = jnp.where(real, first[group] + v - (last_visit - visits)[group], 0)
  lo = jnp.where(real, starts[group], 0)
  hi = jnp.where(real, ends[group], 0)
  return tuple(a.astype(jnp.int32) for a in (tile, group, lo, hi))


def _triton_gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *,
                       block_m, block_k, block_n, k_dim, transpose_rhs):
  """One visit x one block of output columns: lhs tile @ rhs[group], stored on its group's rows."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pl_triton
  visit, col = pl.program_id(0), pl.program_id(1)
  tile, group, lo, hi = tile_ref[visit], group_ref[visit], lo_ref[visit], hi_ref[visit]
  rows = pl.ds(tile * block_m, block_m)
  cols = pl.ds(col * block_n, block_n)

  def step(i, acc):
    inner = pl.ds(i * block_k, block_k)
    a = lhs_ref[rows, inner]
    if transpose_rhs:  # rhs [G, N, K]: read transposed in place, no copy of the weights
      return acc + pl_triton.dot(a, rhs_ref[group, cols, inner], trans_b=True)
    return acc + pl_triton.dot(a, rhs_ref[group, inner, cols])

  acc = jax.lax.fori_loop(0, k_dim // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
  row_ids = tile * block_m + jnp.arange(block_m)
  mine = (row_ids >= lo) & (row_ids < hi)
  pl_triton.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mine[:, None])


def _triton_gmm_call(lhs, rhs, group_sizes, transpose_rhs: bool = False):
  """lhs [M, K] @ rhs[g] ([G, K, N], or [G, N, K] read transposed) -> [M, N]; rows past the
  groups are left unwritten."""
  from jax.experimental import pallas as pl
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  largest_k, params = _triton_params(lhs.dtype)
  block_k, block_n = _tile(k, largest_k), _tile(n, 128)
  x = _pad_rows(lhs, _TRITON_BLOCK_M)
  schedule = tile_schedule(group_sizes, x.shape[0], _TRITON_BLOCK_M)
  kernel = functools.partial(_triton_gmm_kernel, block_m=_TRITON_BLOCK_M, block_k=block_k,
                             block_n=block_n, k_dim=k, transpose_rhs=transpose_rhs)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0], n), lhs.dtype),
                       grid=(schedule[0].shape[0], n // block_n), compiler_params=params,
                       interpret=platform.current().platform != "gpu")(*schedule, x, rhs)
  return out[:m]


def _triton_tgmm_kernel(start_ref, end_ref, lhs_ref, d_out_ref, out_ref, *, block_m, block_k,
                        block_n):
  """d_rhs[g] block = lhs[rows of g]^T @ d_out[rows of g], over the group's rows in steps."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pl_triton
  group, row_block, col_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = start_ref[group], end_ref[group]
  inner = pl.ds(row_block * block_k, block_k)
  cols = pl.ds(col_block * block_n, block_n)

  def step(i, acc):
    first = lo + i * block_m
    mine = ((first + jnp.arange(block_m)) < hi)[:, None]
    a = pl_triton.load(lhs_ref.at[pl.ds(first, block_m), inner], mask=mine, other=0)
    d = pl_triton.load(d_out_ref.at[pl.ds(first, block_m), cols], mask=mine, other=0)
    return acc + pl_triton.dot(a, d, trans_a=True)

  steps = (hi - lo + block_m - 1) // block_m
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_k, block_n), jnp.float32))
  out_ref[group, inner, cols] = acc.astype(out_ref.dtype)


def _triton_tgmm_call(lhs, d_out, group_sizes):
  """[G, K, N]: lhs [M, K] and d_out [M, N] contracted over each group's rows."""
  from jax.experimental import pallas as pl
  (_, k), n, groups = lhs.shape, d_out.shape[1], group_sizes.shape[0]
  largest_k, params = _triton_params(lhs.dtype)
  block_k, block_n = _tile(k, largest_k), _tile(n, 128)
  ends = jnp.cumsum(group_sizes).astype(jnp.int32)
  # A group's last step may read past its end (masked): block_m rows of padding keep it in bounds.
  pad = lambda x: jnp.pad(x, ((0, _TRITON_BLOCK_M), (0, 0)))
  kernel = functools.partial(_triton_tgmm_kernel, block_m=_TRITON_BLOCK_M, block_k=block_k,
                             block_n=block_n)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((groups, k, n), lhs.dtype),
                        grid=(groups, k // block_k, n // block_n), compiler_params=params,
                        interpret=platform.current().platform != "gpu")(
                            ends - group_sizes, ends, pad(lhs), pad(d_out.astype(lhs.dtype)))


@jax.custom_vjp
def _triton_gmm(lhs, rhs, group_sizes):
  return _triton_gmm_call(lhs, rhs, group_sizes)


def _triton_gmm_fwd(lhs, rhs, group_sizes):
  return _triton_gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _triton_gmm_bwd(residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_out = d_out.astype(lhs.dtype)
  # Both kernels read only the groups' rows, so whatever lies past them never reaches a gradient.
  d_lhs = _triton_gmm_call(d_out, rhs, group_sizes, transpose_rhs=True)
  d_rhs = _triton_tgmm_call(lhs, d_out, group_sizes)
  return _zero_tail(d_lhs, group_sizes), d_rhs.astype(rhs.dtype), None


_triton_gmm.defvjp(_triton_gmm_fwd, _triton_gmm_bwd)
