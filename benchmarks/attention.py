"""The `xla` attention (our grouped matmuls around a masked softmax) against
`jax.nn.dot_product_attention` with the same mask, and against PyTorch's fused
`scaled_dot_product_attention` (causal, grouped-query, 2 threads: the peer's attention in
`peer_train_step`), forward and backward, timed in alternation.

  python -m benchmarks.attention [--batch 8 --seq 512 --heads 8 --kv_heads 2 --head_dim 64]
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import time_interleaved
from sigma_moe_jax import attention


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  for name, default in [("batch", 8), ("seq", 512), ("heads", 8), ("kv_heads", 2),
                        ("head_dim", 64), ("repeats", 10)]:
    parser.add_argument(f"--{name}", type=int, default=default)
  a = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (a.batch, a.seq, a.heads, a.head_dim))
  k = jax.random.normal(keys[1], (a.batch, a.seq, a.kv_heads, a.head_dim))
  v = jax.random.normal(keys[2], (a.batch, a.seq, a.kv_heads, a.head_dim))
  cotangent = jax.random.normal(keys[3], q.shape)
  segments = jnp.ones((a.batch, a.seq), jnp.int32).at[:, a.seq // 2:].set(2)
  library = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=attention.causal_document_mask(segments))
  ours = lambda q, k, v: attention.attend(q, k, v, segments, "xla")
  steps = [jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * cotangent),
                                      (0, 1, 2))) for f in (library, ours)]
  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  torch.set_num_threads(2)
  # The peer's layout [B, H, S, D]; one document per row (torch's fused kernel takes a causal
  # flag, not a document mask), so its row gets the plain causal mask's work.
  to_torch = lambda a: torch.tensor(np.asarray(a)).transpose(1, 2).contiguous()
  tq, tk, tv = (to_torch(a).requires_grad_() for a in (q, k, v))
  t_cotangent = to_torch(cotangent)

  def peer():
    tq.grad = tk.grad = tv.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                           enable_gqa=True)
    (out * t_cotangent).sum().backward()
  theirs_s, ours_s, peer_s = time_interleaved([lambda s=s: s(q, k, v) for s in steps] + [peer],
                                              untimed_first=True,
                                              repeats=a.repeats)
  print(f"attention forward + backward, {a.batch} x {a.seq} tokens, {a.heads} heads of "
        f"{a.head_dim} over {a.kv_heads} KV heads, float32")
  print(f"jax.nn.dot_product_attention  {theirs_s * 1e3:8.1f} ms")
  print(f"ours (xla)                    {ours_s * 1e3:8.1f} ms")
  print(f"speed-up                      {theirs_s / ours_s:8.2f}x")
  print(f"torch sdpa (causal, fused)    {peer_s * 1e3:8.1f} ms  (ours / torch time "
        f"{ours_s / peer_s:.2f}x)")


if __name__ == "__main__":
  main()
