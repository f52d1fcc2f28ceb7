"""The accelerator kernels' numerics on the CPU: megablox, our Triton grouped matmul and splash
attention in Pallas interpret mode against the XLA paths and plain-loop oracles, values and every
gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigma_moe_jax import attention
from sigma_moe_jax.infra import platform
from sigma_moe_jax.moe import dispatch, grouped_matmul

# Group sizes with an empty group (first and middle), sizes that are no tile multiple, and rows
# past the last group (which must come out as zeros, gradients included).
GROUPS = np.array([0, 13, 0, 29, 8], np.int32)
M, K, N = 60, 48, 80


def loop_gmm(lhs, rhs, sizes):
  """Plain-loop oracle: each group's rows times its matrix, zeros past the last group."""
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


@pytest.mark.parametrize("backend", ["xla", "megablox", "triton"])
def test_grouped_matmul_matches_the_loop_oracle(backend):
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (M, K))
  rhs = jax.random.normal(keys[1], (len(GROUPS), K, N))
  cotangent = jax.random.normal(keys[2], (M, N))
  sizes = jnp.asarray(GROUPS)

  out = grouped_matmul.gmm(lhs, rhs, sizes, backend)
  np.testing.assert_allclose(out, loop_gmm(np.asarray(lhs), np.asarray(rhs), GROUPS),
                             rtol=1e-4, atol=1e-4)
  d_lhs, d_rhs = jax.jit(jax.grad(lambda a, b: jnp.sum(
      grouped_matmul.gmm(a, b, sizes, backend) * cotangent), (0, 1)))(lhs, rhs)
  want_lhs, want_rhs = jax.jit(jax.grad(lambda a, b: jnp.sum(
      jax.lax.ragged_dot(a, b, sizes) * cotangent), (0, 1)))(lhs, rhs)
  routed = int(GROUPS.sum())
  np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(d_lhs[routed:], 0)  # no unwritten kernel rows leak through
  np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(d_rhs[0], 0)  # an empty group gets no gradient


def test_megablox_tiling_fits_the_tpu_rules():
  for m, k, n, itemsize in [(60, 48, 80, 4), (32768, 1536, 768, 2), (8192, 1024, 512, 4)]:
    tm, tk, tn = grouped_matmul.megablox_tiling(m, k, n, itemsize)
    assert tm % 16 == 0 and tk % 128 == 0 and tn % 128 == 0
    assert 2 * (tm * tk + tk * tn) * itemsize + tm * tn * (4 + 2 * itemsize) <= 12 * 2**20


@pytest.mark.parametrize("backend", ["megablox", "triton"])
def test_ragged_dispatch_with_a_kernel_matches_dense_oracle(backend):
  """The MoE dispatch (sort, grouped matmul, unsort, combine) with the TPU kernel and the Triton
  one, against the dense every-expert oracle, top-2 with masked slots and padding tokens."""
  tokens, d, f, e = 24, 16, 32, 6
  keys = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(keys[0], (tokens, d))
  ids = jax.random.randint(keys[1], (tokens, 2), 0, e)
  ids = ids.at[:, 1].set((ids[:, 0] + 1 + ids[:, 1] % (e - 1)) % e)  # distinct experts
  gates = jax.random.uniform(keys[2], (tokens, 2))
  valid = jnp.ones((tokens, 2), bool).at[::3, 1].set(False).at[-4:].set(False)
  experts = tuple(0.3 * jax.random.normal(k, s) for k, s in
                  zip(keys[3:], [(e, d, f), (e, d, f), (e, f, d)]))
  kernel = functools.partial(dispatch.ragged, backend=backend)

  def loss(run, x, gates, experts):
    return jnp.sum(run(x, ids, gates, valid, experts)[0] ** 2)
  value_and_grad = lambda run: jax.jit(jax.value_and_grad(functools.partial(loss, run),
                                                         (0, 1, 2)))(x, gates, experts)
  want, got = value_and_grad(dispatch.dense), value_and_grad(kernel)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_picks_a_kernel_per_platform():
  tpu, cpu = platform.Target("tpu"), platform.Target("cpu")
  hopper, ampere = platform.Target("gpu", "9.0"), platform.Target("gpu", "8.0")
  ada, volta = platform.Target("gpu", "8.9"), platform.Target("gpu", "7.0")
  bf16 = jnp.bfloat16
  assert grouped_matmul.resolve("auto", tpu, bf16, 1536, 768) == "megablox"
  assert grouped_matmul.resolve("auto", hopper, bf16, 1024, 512) == "mosaic_gpu"
  assert grouped_matmul.resolve("auto", hopper, jnp.float32, 1024, 512) == "triton"
  assert grouped_matmul.resolve("auto", ampere, bf16, 1024, 512) == "triton"
  assert grouped_matmul.resolve("auto", ada, jnp.float32, 256, 128) == "triton"
  assert grouped_matmul.resolve("auto", ampere, bf16, 1024, 500) is None
  assert grouped_matmul.resolve("auto", volta, bf16, 1024, 512) is None
  assert grouped_matmul.resolve("auto", cpu, jnp.float32, 128, 128) == "xla"
  # Dropless on every GPU from Ampere on: ragged stays ragged.
  resolved = dispatch.resolve("ragged", "auto", ampere, bf16, 1024, 512, None)
  assert resolved.run.func is dispatch.ragged and resolved.run.keywords == {"backend": "triton"}
  assert resolved.capacity_factor is None and resolved.pallas
  # No kernel: the ragged dispatch becomes the capacity-padded one, never a dense ragged_dot.
  resolved = dispatch.resolve("ragged", "auto", volta, bf16, 1024, 512, None)
  assert resolved.run is dispatch.padded
  assert resolved.capacity_factor == dispatch.FALLBACK_CAPACITY_FACTOR
  assert attention.resolve("auto", tpu, bf16, 4096, 96) == "splash"
  assert attention.resolve("auto", tpu, bf16, 100, 96) == "xla"
  assert attention.resolve("auto", hopper, bf16, 2048, 64) == "cudnn"
  assert attention.resolve("auto", ampere, bf16, 2048, 64) == "xla"
  assert attention.resolve("auto", cpu, jnp.float32, 256, 32) == "xla"


def test_triton_tile_schedule_visits_every_row_of_every_group_once():
  """Against a plain loop over groups and tiles: each (tile, group) pair that shares a row is one
  visit, in group order, and the unused visits write nothing."""
  rng = np.random.default_rng(3)
  for sizes in [GROUPS, np.array([64, 0, 1, 127, 0], np.int32), rng.integers(0, 40, 12)]:
    rows = -(-max(int(sizes.sum()), 1) // 16) * 16 + 16
    tile, group, lo, hi = map(np.asarray, grouped_matmul.tile_schedule(
        jnp.asarray(sizes, jnp.int32), rows, 16))
    want, start = [], 0
    for g, size in enumerate(sizes):
      if size:
        want += [(t, g, start, start + size) for t in range(start // 16, -(-(start + size) // 16))]
      start += size
    got = list(zip(tile, group, lo, hi))
    assert [tuple(map(int, v)) for v in got[:len(want)]] == want
    assert all(a == b for _, _, a, b in got[len(want):])  # empty row range
    assert len(got) == rows // 16 + len(sizes)


def packed_segments(batch, seq, rng):
  """Rows of 2 to 4 packed documents and a padded tail (segment id 0)."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(8, seq - 8), size=rng.integers(2, 5), replace=False))
    row = np.zeros(seq, np.int32)
    for i, (a, b) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
      row[a:b] = i + 1
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def attention_case(batch, seq, heads, kv_heads, head_dim, seed):
  """q, k, v, a cotangent of the output, and packed segments with padding."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
  cotangent = jax.random.normal(keys[3], q.shape)
  return (q, k, v), cotangent, packed_segments(batch, seq, np.random.default_rng(seed))


def assert_same_values_and_gradients(got_fn, want_fn, qkv, cotangent, tolerance):
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * cotangent)
  want = jax.jit(jax.value_and_grad(loss(want_fn), (0, 1, 2)))(*qkv)
  got = jax.jit(jax.value_and_grad(loss(got_fn), (0, 1, 2)))(*qkv)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def test_xla_attention_matches_the_library_attention_values_and_gradients():
  """Our grouped-query attention against jax.nn.dot_product_attention with the same causal,
  document-local mask: packed documents, padding, 2 query heads per KV head."""
  qkv, cotangent, segments = attention_case(2, 48, 4, 2, 8, seed=5)
  library = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=attention.causal_document_mask(segments))
  ours = lambda q, k, v: attention.attend(q, k, v, segments, "xla")
  assert_same_values_and_gradients(ours, library, qkv, cotangent, 1e-5)


@pytest.mark.parametrize("block,keep_weights", [(48, False), (16, False), (20, True), (7, False),
                                               (7, True)])
def test_blockwise_attention_matches_the_library_at_any_block_size(block, keep_weights):
  """One block (the whole matrix), blocks that divide the sequence and ragged ones: values and
  the gradients of the backward, recomputing the weights or reading those the forward kept,
  equal the library's."""
  qkv, cotangent, segments = attention_case(2, 48, 4, 2, 8, seed=7)
  library = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=attention.causal_document_mask(segments))
  ours = lambda q, k, v: attention._blockwise(q, k, v, segments, block, keep_weights)
  assert_same_values_and_gradients(ours, library, qkv, cotangent, 1e-5)


def test_blockwise_attention_keeps_bfloat16_and_matches_float32():
  qkv, cotangent, segments = attention_case(1, 40, 4, 1, 16, seed=9)
  bf16 = [a.astype(jnp.bfloat16) for a in qkv]
  loss = lambda *qkv: jnp.sum(attention.attend(*qkv, segments, "xla").astype(jnp.float32)
                              * cotangent)
  grad = jax.jit(jax.grad(loss, (0, 1, 2)))
  grads = grad(*bf16)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  want = grad(*[a.astype(jnp.float32) for a in bf16])
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0.05,
                               atol=0.05 * float(jnp.max(jnp.abs(ref))))


def test_splash_attention_matches_xla_values_and_gradients():
  qkv, cotangent, segments = attention_case(2, 256, 4, 2, 32, seed=2)
  impl = lambda name: lambda q, k, v: attention.attend(q, k, v, segments, name)
  assert_same_values_and_gradients(impl("splash"), impl("xla"), qkv, cotangent, 2e-4)


def test_cudnn_document_layout_matches_a_loop():
  segments = np.asarray(packed_segments(3, 64, np.random.default_rng(1)))
  lengths, offsets = attention.document_lengths_and_offsets(jnp.asarray(segments), 6)
  for row, got_lengths, got_offsets in zip(segments, np.asarray(lengths), np.asarray(offsets)):
    starts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1]]
    ends = starts[1:] + [len(row)]
    want_lengths = [b - a for a, b in zip(starts, ends)] + [-1] * (6 - len(starts))
    want_offsets = starts + [-1] * (7 - len(starts))
    assert got_lengths.tolist() == want_lengths and got_offsets.tolist() == want_offsets
