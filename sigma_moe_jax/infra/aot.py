"""The train step compiled ahead of time for hardware this host does not have.

TPU: with libtpu installed, `tpu_devices("v5p:4x4x4")` describes a real topology on any host, and
`compile_train_step` runs the real XLA:TPU compiler over a mesh of those devices (kernels,
shardings and all); the result's memory and cost analyses are per device.

GPU: with the CUDA plugin installed (`requirements-gpu-aot.txt`; no GPU, driver or CUDA toolkit
needed, `JAX_PLATFORMS=cpu`), `gpu_devices("h100", 8)` describes eight compile-only GPUs from an
XLA target config (`sigma_moe_jax/gpu_targets/`), and `compile_train_step` runs the real XLA:GPU
compiler for them: Mosaic GPU, Triton and cuDNN kernels included; memory analysis per device (XLA
gives no cost analysis there). `export_train_step` only lowers the step with `jax.export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import re
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from sigma_moe_jax import attention
from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.infra import platform, sharding
from sigma_moe_jax.schedule import TopKSchedule
from sigma_moe_jax.training import step as train_lib

# High-bandwidth memory per chip, bytes, by `device_kind`.
HBM_BYTES = {"TPU v4": 32e9, "TPU v5 lite": 16e9, "TPU v5": 95e9, "TPU v6 lite": 32e9,
             "TPU7x": 192e9}


# GPU target configs shipped in sigma_moe_jax/gpu_targets (sources named in each file).
GPU_TARGETS = ("h100", "h200", "a100", "rtx4090")


def gpu_target_config(gpu: str) -> str:
  """The XLA GpuTargetConfig text proto of a GPU in GPU_TARGETS, or a path to one."""
  if gpu in GPU_TARGETS:
    return (importlib.resources.files("sigma_moe_jax") / "gpu_targets" / f"{gpu}.txtpb").read_text()
  try:
    with open(gpu) as f:
      return f.read()
  except OSError:
    raise ValueError(f"unknown GPU {gpu!r}: expected one of {GPU_TARGETS} or the path of an XLA "
                     f"GpuTargetConfig text proto") from None


def gpu_devices(gpu: str, count: int) -> Sequence:
  """`count` compile-only devices of one host of GPUs (needs the CUDA plugin, not a GPU)."""
  config = gpu_target_config(gpu)
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=f"1x1x{count}").devices
  except Exception as e:  # plugin missing, or a target config it cannot parse
    raise ValueError(f"cannot describe {count} x {gpu} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); install the CUDA plugin with "
                     f"`pip install --no-deps -r requirements-gpu-aot.txt` and run with "
                     f"JAX_PLATFORMS=cpu") from None


def gpu_memory_bytes(gpu: str) -> float:
  """The card's memory as its target config states it (`device_memory_size`)."""
  found = re.search(r"device_memory_size:\s*(\d+)", gpu_target_config(gpu))
  if not found:
    raise ValueError(f"the target config of {gpu!r} states no device_memory_size")
  return float(found.group(1))


def tpu_devices(topology: str) -> Sequence:
  """Device descriptions of a TPU topology such as "v5p:2x2x1" (needs libtpu, not a TPU)."""
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # libtpu missing, or a topology name it does not know
    raise ValueError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu with "
                     f"`pip install -r requirements-tpu.txt`") from None


@dataclasses.dataclass
class StepPlan:
  """Everything a train step is built from (what `sigma_moe_jax.training.settings` describes)."""

  model: ModelConfig
  schedule: Optional[TopKSchedule]
  balance: train_lib.BalanceSettings
  optimizer: object
  lr: object
  batch_size: int
  seq_len: int
  grad_accum: int = 1
  loss_mask: bool = False  # the batch carries a loss mask (supervised fine-tuning)


def _abstract_inputs(plan: StepPlan, mesh):
  """(jitted step, abstract state, abstract batch): shapes and shardings, nothing allocated."""
  graphdef, abstract, shardings = train_lib.abstract_sharded_state(plan.model, plan.optimizer,
                                                                   mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
  batch = {name: jax.ShapeDtypeStruct((plan.batch_size, plan.seq_len), jnp.int32,
                                      sharding=batch_sharding)
           for name in ("tokens", "segment_ids", "positions")
           + (("loss_mask",) if plan.loss_mask else ())}
  step = train_lib.jit_train_step(graphdef, plan.optimizer, plan.lr, plan.model, plan.balance,
                                  shardings, mesh, schedule=plan.schedule,
                                  grad_accum=plan.grad_accum)
  return step, state, batch


@dataclasses.dataclass
class CompileReport:
  target: str
  devices: int
  device_kind: str
  lower_seconds: float
  compile_seconds: float
  memory: Dict[str, float]  # per device, bytes
  hbm_bytes: Optional[float]
  flops_per_device: Optional[float]
  kernels: List[str]
  dense_ragged_dot: bool = False  # a ragged_dot left for XLA (dense on GPUs and CPUs)
  collectives: Dict[str, int] = dataclasses.field(default_factory=dict)  # op -> count
  # The dropless exchange as jax lowered it; XLA:GPU may compile it into all-to-all operations.
  ragged_all_to_all: bool = False


# XLA:GPU rewrites large sorts (the dispatch's sort by expert) into CUB radix sorts, and sizes
# their scratch by calling the CUDA libraries while compiling, which a host without CUDA cannot
# ("Error loading CUDA libraries"). Compile-only, XLA's own sort is used instead; on a GPU the CUB
# sort runs, with a scratch buffer of a few MB that the memory figures leave out.
_GPU_COMPILE_ONLY_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def compile_train_step(plan: StepPlan, mesh, hbm_bytes: Optional[float] = None) -> CompileReport:
  """Lowers and compiles the train step for the mesh's devices (a TPU topology, compile-only
  GPUs). `hbm_bytes`: the device's memory where the device kind table has none (GPUs)."""
  device = mesh.devices.flat[0]
  gpu = platform.of_device(device).platform == "gpu"
  with (jax.set_mesh(mesh),
        attention.cudnn_checks_answered_for_export() if gpu else contextlib.nullcontext()):
    step, state, batch = _abstract_inputs(plan, mesh)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered_text = lowered.as_text()
    dense_ragged_dot = "chlo.ragged_dot" in lowered_text
    ragged_exchange = "@ragged_all_to_all" in lowered_text
    compiled = lowered.compile(compiler_options=_GPU_COMPILE_ONLY_OPTIONS if gpu else None)
    done = time.perf_counter()
  stats = compiled.memory_analysis()
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "code": stats.generated_code_size_in_bytes}
  # Donated state is aliased to the outputs: count it once.
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"] + memory["code"])
  try:
    cost = compiled.cost_analysis()
  except Exception:  # XLA:GPU for compile-only devices has none
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  text = compiled.as_text()
  return CompileReport(
      target=device.platform, devices=mesh.devices.size, device_kind=device.device_kind,
      lower_seconds=lowered_at - start, compile_seconds=done - lowered_at, memory=memory,
      hbm_bytes=hbm_bytes or HBM_BYTES.get(device.device_kind),
      flops_per_device=cost.get("flops") if cost else None,
      kernels=gpu_kernels(text) if gpu else tpu_kernels(text), dense_ragged_dot=dense_ragged_dot,
      collectives=collectives(text), ragged_all_to_all=ragged_exchange)


def tpu_kernels(hlo_text: str) -> List[str]:
  """Pallas kernels in a compiled TPU program, by instruction name (gmm, tgmm, splash_mha_...)."""
  names = set()
  for line in hlo_text.splitlines():
    if 'custom_call_target="tpu_custom_call"' in line:
      name = line.split("=")[0].strip().lstrip("%")
      names.add(re.sub(r"\.\d+$", "", name))
  return sorted(names)


_COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce",
                "collective-permute")


def collectives(hlo_text: str) -> Dict[str, int]:
  """Collective operations in a compiled program, by HLO op name (async starts counted once)."""
  found = {}
  for op in re.findall(r"= [^=]*? ([a-z-]+)\(", hlo_text):
    op = op[:-len("-start")] if op.endswith("-start") else op
    if op in _COLLECTIVES:
      found[op] = found.get(op, 0) + 1
  return found


def gpu_kernels(hlo_text: str) -> List[str]:
  """Kernels in a compiled GPU program: cuDNN and other library custom calls by target, Pallas
  kernels (Mosaic GPU, Triton) by the name of the kernel function."""
  names = set()
  for line in hlo_text.splitlines():
    found = re.search(r'custom_call_target="([^"]+)"', line)
    if not found:
      continue
    target = found.group(1)
    kernel = re.search(r'\bname = "([\w.]+)"', line)
    if target == "__gpu$xla.gpu.triton" or target.startswith("mosaic_gpu"):
      names.add(f"{target.split('.')[-1]}:{kernel.group(1)}" if kernel else target)
    else:
      names.add(target)
  return sorted(names)


@dataclasses.dataclass
class ExportReport:
  target: str
  export_seconds: float
  kernels: List[str]  # custom-call targets of the exported module
  dense_ragged_dot: bool  # a ragged_dot left for XLA, which lowers it densely on GPUs


def export_train_step(plan: StepPlan, compute_capability: str = platform.HOPPER) -> ExportReport:
  """`jax.export` of the train step for CUDA on one GPU of the given compute capability."""
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  accept = [jax.export.DisabledSafetyCheck.custom_call(name)
            for name in attention.cudnn_custom_calls()]
  target = platform.Target("gpu", compute_capability)
  with (jax.set_mesh(mesh), platform.exporting_for(target),
        attention.cudnn_checks_answered_for_export()):
    step, state, batch = _abstract_inputs(plan, mesh)
    start = time.perf_counter()
    exported = jax.export.export(step, platforms=("cuda",), disabled_checks=accept)(state, batch)
    seconds = time.perf_counter() - start
  text = exported.mlir_module()
  calls = sorted(set(re.findall(r'stablehlo\.custom_call @"?([\w$.]+)', text)))
  return ExportReport(f"cuda (compute capability {compute_capability})", seconds, calls,
                      "chlo.ragged_dot" in text)
