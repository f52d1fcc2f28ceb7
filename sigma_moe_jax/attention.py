"""Causal attention over packed documents, with one kernel per platform.

  out = attend(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], segment_ids [B, S], impl)

A token attends to earlier tokens of its own document (equal segment id); Hq is a multiple of Hkv
(grouped-query attention). Implementations (`ModelConfig.attention`):
  xla     two batched matmuls around a masked float32 softmax, the query heads of each KV head
          stacked into one matrix; keeps [Hq, S, S] scores per sequence. The CPU path and the
          oracle (tests check it against `jax.nn.dot_product_attention`, which XLA:CPU ran
          1.8-1.9x slower, forward and backward, at 8 x 512 tokens and 8 heads of 64 over 2 KV
          heads: benchmarks/attention.py).
  splash  the Pallas TPU splash-attention kernel (causal mask in the kernel, segment ids
          compared block by block); interpreted when traced for a CPU (tests). Needs S to be a
          multiple of 128.
  cudnn   cuDNN flash attention in its packed-document layout (per-row document lengths and
          offsets; Hopper or newer, 16-bit inputs). A row may hold at most
          `cudnn_max_documents(S)` documents.
  auto    splash on TPU, cudnn on a GPU where it applies, xla otherwise.
"""

from __future__ import annotations

import contextlib
import math
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from sigma_moe_jax.infra import platform, sharding

ATTENTIONS = ("auto", "xla", "splash", "cudnn")
_SPLASH_BLOCKS = (512, 256, 128)


def resolve(name: str, target: platform.Target, dtype, seq_len: int, head_dim: int) -> str:
  if name not in ATTENTIONS:
    raise ValueError(f"unknown attention {name!r}; expected one of {ATTENTIONS}")
  if name != "auto":
    return name
  if target.platform == "tpu" and seq_len % 128 == 0:
    return "splash"
  if target.platform == "gpu" and cudnn_applies(target, dtype, head_dim):
    return "cudnn"
  return "xla"


def cudnn_applies(target: platform.Target, dtype, head_dim: int) -> bool:
  capability = target.compute_capability
  return (capability is not None and float(capability) >= 9.0 and head_dim % 8 == 0
          and head_dim <= 128 and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                       jnp.dtype(jnp.float16)))


def cudnn_max_documents(seq_len: int) -> int:
  """Documents a row may hold on the cudnn path (a static size of cuDNN's packed layout)."""
  return max(1, seq_len // 16)


def attend(q: Float[Array, "B S Hq Dh"], k: Float[Array, "B S Hkv Dh"],
           v: Float[Array, "B S Hkv Dh"], segment_ids: Int[Array, "B S"],
           impl: str) -> Float[Array, "B S Hq Dh"]:
  if impl == "xla":
    return _xla(q, k, v, segment_ids)
  if impl == "splash":
    return _splash(q, k, v, segment_ids)
  if impl == "cudnn":
    return _cudnn(q, k, v, segment_ids)
  raise ValueError(f"unknown attention implementation {impl!r}")


def _xla(q, k, v, segment_ids):
  """Grouped-query attention as [B, Hkv] batches of ([G x S, D] @ [D, T]) matmuls: the G query
  heads sharing a KV head are stacked into rows, so K and V are never repeated and every matmul
  has its batch dimensions leading (what XLA:CPU runs fastest)."""
  b, s, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  rows = q.reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
  keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  scores = jnp.einsum("bkqd,bktd->bkqt", rows, keys, preferred_element_type=jnp.float32)
  scores = (scores * (1 / math.sqrt(d))).reshape(b, kv, g, s, s)
  mask = causal_document_mask(segment_ids)[:, :, None]  # [B, 1, 1, S, T]
  weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
  out = jnp.einsum("bkqt,bktd->bkqd", weights.reshape(b, kv, g * s, s).astype(v.dtype), values)
  return out.reshape(b, kv, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def causal_document_mask(segment_ids: Int[Array, "B S"]) -> Array:
  """[B, 1, S, S] bool: causal, and inside one packed document."""
  seq = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same_doc)[:, None]


# TPU: splash attention ------------------------------------------------------------------------


def _splash(q, k, v, segment_ids):
  """Runs per device inside a shard_map (Pallas TPU kernels cannot be partitioned by XLA): batch
  over the mesh's batch axes, heads over `tensor` where it divides both head counts."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  seq, head_dim = q.shape[1], q.shape[3]
  if seq % 128:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got "
                     f"{seq}")
  block = next(b for b in _SPLASH_BLOCKS if seq % b == 0)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  interpret = platform.current().platform != "tpu"

  def local(q, k, v, segment_ids):
    local_heads = q.shape[2]
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * local_heads)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # [B, S, H, D] -> [B, H, S, D]
    scaled = heads_first(q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype))
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
        scaled, heads_first(k), heads_first(v), segment_ids)
    return heads_first(out)

  return _per_device(local, q, k, v, segment_ids)


def _per_device(local, q, k, v, segment_ids):
  """`local` run on each device's share inside a shard_map: batch over the mesh's batch axes,
  heads over `tensor` where it divides both head counts. For kernels XLA cannot partition
  (Pallas TPU), or whose partitioner refuses a batch split over several axes (cuDNN's)."""
  mesh = sharding.current_mesh()
  tensor = sharding.axis_size(mesh, "tensor")
  heads = "tensor" if tensor > 1 and not (q.shape[2] % tensor or k.shape[2] % tensor) else None
  batch = sharding.batch_axes(mesh) or None
  spec = P(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch)), out_specs=spec,
                       check_vma=False)(q, k, v, segment_ids)


# GPU: cuDNN -----------------------------------------------------------------------------------


def document_lengths_and_offsets(segment_ids: Int[Array, "B S"], max_documents: int):
  """cuDNN's packed layout of contiguous documents: (lengths [B, M], offsets [B, M + 1]) with
  unused entries -1. Padding (segment id 0) forms documents of its own, as in the xla path."""
  batch, seq = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

  def row(starts):
    first = jnp.nonzero(starts, size=max_documents, fill_value=seq)[0].astype(jnp.int32)
    present = first < seq
    end = jnp.concatenate([first[1:], jnp.full((1,), seq, jnp.int32)])
    lengths = jnp.where(present, end - first, -1)
    offsets = jnp.concatenate([jnp.where(present, first, -1), jnp.full((1,), -1, jnp.int32)])
    return lengths, offsets
  return jax.vmap(row)(starts)


def _cudnn(q, k, v, segment_ids):
  """Per device inside a shard_map: cuDNN attention's own partitioner fails an assertion when the
  batch is split over a mesh axis other than its first (experts x 8 on H100s, compiled)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  def local(q, k, v, segment_ids):
    lengths, offsets = document_lengths_and_offsets(segment_ids, cudnn_max_documents(q.shape[1]))
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=1 / math.sqrt(q.shape[-1]), mask_type=cudnn.MaskType.CAUSAL, qkv_layout="BTNH")

  return _per_device(local, q, k, v, segment_ids)


@contextlib.contextmanager
def cudnn_checks_answered_for_export():
  """cuDNN attention checks the local cuDNN version and GPU while tracing (forward and backward).
  To export for a Hopper GPU from a host without one, those checks are answered for the target
  (cuDNN 9.8 on a Hopper) while this context is open; on a GPU nothing changes."""
  if jax.local_devices()[0].platform == "gpu":
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  names = ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal")
  saved = {name: getattr(cudnn, name) for name in names}
  cudnn.check_cudnn_version = lambda: 90800
  cudnn.check_compute_capability = lambda capability: True
  cudnn.is_cuda_compute_capability_equal = lambda capability: False
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(cudnn, name, value)


def cudnn_custom_calls() -> tuple:
  """Custom-call targets cuDNN attention may emit (jax.export must be told to accept them)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  return tuple(sorted({cudnn.get_custom_call_name(bias, dropout, backward)
                       for bias in (False, True) for dropout in (False, True)
                       for backward in (False, True)}))

