"""Which accelerator a program is built for, so that kernels are chosen in one place.

The target is read from the devices the program is compiled for, never from the host: the
concrete mesh set with `jax.set_mesh` (its devices carry the platform, NVIDIA's compute
capability and the SM count, also for compile-only devices of a topology described on a CPU
host: a v5p slice, or H100s from `gpu_targets`), else the abstract mesh's device (platform and
SM count; its compute capability is the host's when the host has that kind of device), else the
default backend. Inside jit, `jax.sharding.get_mesh` refuses to answer, so the concrete mesh is
read where it lives (`jax._src.mesh.get_concrete_mesh`, what `get_mesh` returns outside jit).
`exporting_for` overrides all of them, for `jax.export` of a GPU program on a host without it.
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
  # Streaming multiprocessors (GPU) or cores, where the device says; None when unknown.
  core_count: Optional[int] = None


_override: Optional[Target] = None


def _normalise(platform: str) -> str:
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def of_device(device) -> Target:
  """The target a device stands for: a real one, or a compile-only one of a described topology."""
  platform = _normalise(device.platform)
  capability = getattr(device, "compute_capability", None) if platform == "gpu" else None
  cores = getattr(device, "core_count", None) or getattr(device, "num_cores", None)
  return Target(platform, None if capability is None else str(capability),
                None if cores is None else int(cores))


def current() -> Target:
  """The target of the program being traced."""
  if _override is not None:
    return _override
  mesh = _concrete_mesh()
  if mesh is not None and not mesh.empty:
    return of_device(mesh.devices.flat[0])
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty:
    target = of_device(abstract.abstract_device)
    local = of_device(jax.local_devices()[0])
    # An abstract device carries no compute capability: it is the host's when they are alike.
    same = (local.platform == target.platform
            and jax.local_devices()[0].device_kind == abstract.abstract_device.device_kind)
    return local if same else target
  return of_device(jax.local_devices()[0])


def _concrete_mesh():
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  get = getattr(mesh_lib, "get_concrete_mesh", None)
  return None if get is None else get()


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
