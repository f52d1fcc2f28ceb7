"""Training metrics: model FLOPs per token, the device's peak rate, and the writers (one readable
line per interval, JSON lines, TensorBoard)."""

from __future__ import annotations

import json
import sys
import time
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.infra import storage
from sigma_moe_jax.params import count_params

# Dense bf16 peak per chip, for MFU on accelerators. Unknown kinds are measured like the CPU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
              "TPU v5": 459e12}  # v5p reports "TPU v5"; prefixes are tried in this order


def flops_per_token(cfg: ModelConfig, seq_len: int, top_k: Optional[Sequence[int]] = None) -> float:
  """Training FLOPs per token: 6 x activated matmul parameters (LM head included, the embedding
  lookup not) + causal attention scores and values (6 x layers x heads x head_dim x seq_len)."""
  counts = count_params(cfg, top_k)
  matmul_params = counts["active"] + cfg.vocab_size * cfg.d_model
  attention = 6 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
  return 6.0 * matmul_params + attention


def measure_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """Float32 matmul rate of the default device, in FLOP/s (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops_per_device() -> float:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return measure_matmul_flops()


def _to_json(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class _BucketEventFiles:
  """tensorboardX's writer factory for gs:// log directories, through `storage.Appender` (its
  own needs the google-cloud-storage client)."""

  def __init__(self, min_interval: float):
    self.min_interval, self.opened = min_interval, []

  def open(self, path):
    self.opened.append(storage.Appender(path, self.min_interval, binary=True))
    return self.opened[-1]

  def directory_check(self, path):
    del path  # a bucket has no directories to create


def _tensorboardx():
  """(SummaryWriter, record_writer), imported on first use (only the writing process needs them).
  tensorboardX imports PyTorch when it is installed, only to accept torch tensors (we pass
  numpy): 1.5 s of every run's start. Unless torch is loaded already, it is hidden meanwhile."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter, record_writer  # noqa: PLC0415
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter, record_writer


class MetricsWriter:
  """Writes on the first process only: stdout line, `metrics.jsonl`, TensorBoard events.

  In a bucket both files are rewritten at most every `min_interval` seconds, and at `flush`
  (before each checkpoint save) and `close`."""

  def __init__(self, workdir: str, enabled: bool = True, min_interval: float = 30.0):
    self.enabled = enabled
    self.path = storage.join(workdir, "metrics.jsonl")
    self.tensorboard = self.lines = None
    if enabled:
      SummaryWriter, record_writer = _tensorboardx()
      self._event_files = _BucketEventFiles(min_interval)
      record_writer.register_writer_factory("gs", self._event_files)
      storage.makedirs(workdir)
      self.lines = storage.Appender(self.path, min_interval)
      self.tensorboard = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Dict, line: Optional[str] = None):
    if not self.enabled:
      return
    record = {"step": step, **{k: _to_json(v) for k, v in metrics.items()}}
    self.lines.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name == "step":
        continue
      value = np.asarray(value)
      if value.ndim == 0:
        self.tensorboard.add_scalar(name, float(value), step)
      elif value.ndim == 1:
        for layer, v in enumerate(value):
          self.tensorboard.add_scalar(f"{name}/layer_{layer}", float(v), step)
    self.tensorboard.flush()
    if line:
      print(line, flush=True)

  def flush(self):
    """Everything written so far reaches storage (in a bucket: now, not at the next interval)."""
    if self.enabled:
      self.tensorboard.flush()
      self.lines.flush(force=True)
      for events in self._event_files.opened:
        events.flush(force=True)

  def close(self):
    if self.enabled:
      self.flush()
      self.tensorboard.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
