"""Causal attention over packed documents, with one kernel per platform.

  out = attend(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], segment_ids [B, S], impl)

A token attends to earlier tokens of its own document (equal segment id); Hq is a multiple of Hkv
(grouped-query attention). Implementations (`ModelConfig.attention`):
  xla     blockwise in plain XLA: query rows in about eight blocks, each against the keys up to
          its end (the upper triangle skipped), the query heads of each KV head stacked into
          one matrix, a float32 softmax; the backward recomputes each block's weights from its
          log-sum-exp instead of keeping [Hq, S, S] weights. The CPU path and the fallback
          elsewhere (tests check it against `jax.nn.dot_product_attention`;
          benchmarks/attention.py times the two).
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
import functools
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
           impl: str, keep_weights: bool = False) -> Float[Array, "B S Hq Dh"]:
  """`keep_weights` (the xla path only): keep each query block's softmax numerators from the
  forward for the backward instead of recomputing them from the log-sum-exp, at about
  B x Hq x S^2 / 2 float32 per layer. Unrolled layers ask for it (`AttentionConfig`): nothing
  stacks their residuals, and the backward saves a matmul and an exponential per block (9% of
  the attention's forward and backward at the d 512 CPU shape, benchmarks/attention.py)."""
  if impl == "xla":
    return _blockwise(q, k, v, segment_ids, query_block(q.shape[1]), keep_weights)
  if impl == "splash":
    return _splash(q, k, v, segment_ids)
  if impl == "cudnn":
    return _cudnn(q, k, v, segment_ids)
  raise ValueError(f"unknown attention implementation {impl!r}")


# CPU (and the oracle): blockwise causal attention in XLA ----------------------------------------


def query_block(seq_len: int) -> int:
  """Query rows per block of the xla path: about eight blocks, at least 32 rows."""
  return max(32, -(-seq_len // 8))


def _blocks(seq_len: int, block: int):
  """(start, size) of each query block; block i sees keys 0 .. start + size."""
  return [(start, min(block, seq_len - start)) for start in range(0, seq_len, block)]


def _block_mask(segment_ids, start: int, size: int):
  """[B, 1, 1, size, start + size] bool: causal, and inside one packed document."""
  keys = start + size
  causal = (start + jnp.arange(size))[:, None] >= jnp.arange(keys)[None, :]
  same_doc = segment_ids[:, start:keys, None] == segment_ids[:, None, :keys]
  return (causal[None] & same_doc)[:, None, None]


def _grouped(a, kv_heads: int):
  """[B, S, H, D] -> [B, Hkv, G, S, D]: the G query heads sharing a KV head side by side."""
  b, s, h, d = a.shape
  return a.reshape(b, s, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(a):
  b, kv, g, s, d = a.shape
  return a.transpose(0, 3, 1, 2, 4).reshape(b, s, kv * g, d)


def _block_scores(rows, keys, segment_ids, start, size):
  """Scaled float32 scores of query block (start, size) against its keys, masked ones -1e30:
  [B, Hkv, G, size, start + size]."""
  b, kv, g, _, d = rows.shape
  block_rows = rows[:, :, :, start:start + size].reshape(b, kv, g * size, d)
  scores = jnp.einsum("bkqd,bktd->bkqt", block_rows, keys[:, :, :start + size],
                      preferred_element_type=jnp.float32) * (1 / math.sqrt(d))
  mask = _block_mask(segment_ids, start, size)
  return jnp.where(mask, scores.reshape(b, kv, g, size, start + size), -1e30)


def _attend_blocks(q, k, v, segment_ids, block):
  """(out [B, Hkv, G, S, D], log-sum-exp of each query row's scores [B, Hkv, G, S], and per
  block its softmax numerators exp(scores - row max) and 1 / their row sums)."""
  rows = _grouped(q, k.shape[2])
  keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  b, kv, g, _, d = rows.shape
  outs, lses, numerators = [], [], []
  for start, size in _blocks(q.shape[1], block):
    scores = _block_scores(rows, keys, segment_ids, start, size)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - peak)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    # Normalised after the matmul: a division over D columns instead of over the block's keys.
    out = jnp.einsum("bkqt,bktd->bkqd", exp.reshape(b, kv, g * size, start + size).astype(v.dtype),
                     values[:, :, :start + size], preferred_element_type=jnp.float32)
    outs.append((out.reshape(b, kv, g, size, d) / total).astype(v.dtype))
    lses.append((peak + jnp.log(total))[..., 0])
    numerators.append((exp, 1 / total))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3), numerators


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, segment_ids, block, keep_weights=False):
  """Grouped-query causal attention, query rows in blocks of `block`: block i computes scores
  against keys 0 .. (i + 1) * block only (the masked-out upper triangle is skipped), and the
  backward recomputes each block's weights from its log-sum-exp rather than keeping [S, S]
  weights per layer between the passes (on XLA:CPU, storing and reloading those cost more than
  recomputing them). The G query heads of each KV head are stacked into one matrix, so K and V
  are never repeated and every matmul has its batch dimensions leading. With `keep_weights`
  the backward reads each block's weights from the forward instead (`attend`)."""
  return _ungrouped(_attend_blocks(q, k, v, segment_ids, block)[0])


def _blockwise_forward(q, k, v, segment_ids, block, keep_weights):
  out, lse, numerators = _attend_blocks(q, k, v, segment_ids, block)
  return _ungrouped(out), (q, k, v, segment_ids, out, lse, numerators if keep_weights else None)


def _blockwise_backward(block, keep_weights, saved, d_out):
  del keep_weights  # the residuals say it
  q, k, v, segment_ids, out, lse, numerators = saved
  rows, d_rows = _grouped(q, k.shape[2]), _grouped(d_out, k.shape[2])
  keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  b, kv, g, _, d = rows.shape
  # d(softmax): dS = P * (dP - rowsum(dO * O)), the row sum taken once for all blocks.
  row_dot = jnp.sum(d_rows.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_keys = jnp.zeros(keys.shape, jnp.float32)
  d_values = jnp.zeros(values.shape, jnp.float32)
  d_queries = []
  for i, (start, size) in enumerate(_blocks(q.shape[1], block)):
    stop = start + size
    block_rows = rows[:, :, :, start:stop].reshape(b, kv, g * size, d)
    block_d_out = d_rows[:, :, :, start:stop]
    flat = lambda a: a.reshape(b, kv, g * size, a.shape[-1])
    if numerators is None:
      # Masked scores are -1e30, so their weights come out 0 without a second select.
      scores = _block_scores(rows, keys, segment_ids, start, size)
      weights = numerator = jnp.exp(scores - lse[:, :, :, start:stop, None])
      d_out_per_total = block_d_out  # the weights are normalised already
    else:  # weights = numerator / row sum; dV divides the [rows, D] side instead
      numerator, inverse_total = numerators[i]
      weights = numerator * inverse_total
      d_out_per_total = (block_d_out.astype(jnp.float32) * inverse_total).astype(v.dtype)
    block_d_out = flat(block_d_out)
    d_values = d_values.at[:, :, :stop].add(jnp.einsum(
        "bkqt,bkqd->bktd", flat(numerator).astype(v.dtype), flat(d_out_per_total),
        preferred_element_type=jnp.float32))
    d_weights = jnp.einsum("bkqd,bktd->bkqt", block_d_out, values[:, :, :stop],
                           preferred_element_type=jnp.float32).reshape(numerator.shape)
    d_scores = flat(weights * (d_weights - row_dot[:, :, :, start:stop, None])
                    * (1 / math.sqrt(d))).astype(q.dtype)
    d_queries.append(jnp.einsum("bkqt,bktd->bkqd", d_scores, keys[:, :, :stop],
                                preferred_element_type=jnp.float32).reshape(b, kv, g, size, d))
    d_keys = d_keys.at[:, :, :stop].add(jnp.einsum("bkqt,bkqd->bktd", d_scores, block_rows,
                                                   preferred_element_type=jnp.float32))
  from_heads_first = lambda a, like: a.transpose(0, 2, 1, 3).astype(like.dtype)
  return (_ungrouped(jnp.concatenate(d_queries, axis=3)).astype(q.dtype),
          from_heads_first(d_keys, k), from_heads_first(d_values, v), None)


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


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

