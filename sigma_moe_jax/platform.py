"""Which accelerator a program is built for, so that kernels are chosen in one place.

Inside jit the target comes from the ambient mesh's devices (`jax.set_mesh`), which may differ
from the host: a v5p topology compiled ahead of time on a CPU host is a TPU target. Without a
mesh it is the default backend. `exporting_for` overrides both, for `jax.export` of a GPU
program on a host without that GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
HOPPER = "9.0"  # compute capability of H100 / H200 / GH200


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str  # one of PLATFORMS
  # NVIDIA compute capability ("9.0" Hopper, "10.0" Blackwell); None elsewhere or unknown.
  compute_capability: Optional[str] = None


_override: Optional[Target] = None


def _normalise(platform: str) -> str:
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def current() -> Target:
  """The target of the program being traced."""
  if _override is not None:
    return _override
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = _normalise(device.platform if device is not None else jax.default_backend())
  capability = None
  if platform == "gpu":
    local = jax.local_devices()[0]
    capability = getattr(local, "compute_capability", None)
  return Target(platform, capability)


@contextlib.contextmanager
def exporting_for(target: Target) -> Iterator[Target]:
  """Traces under this context build kernels for `target` whatever the host is (jax.export)."""
  global _override
  if target.platform not in PLATFORMS:
    raise ValueError(f"unknown platform {target.platform!r}; expected one of {PLATFORMS}")
  saved, _override = _override, target
  try:
    yield target
  finally:
    _override = saved
