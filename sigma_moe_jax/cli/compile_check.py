"""Checks a training config against the hardware it is meant for, before launching it there.

  python -m sigma_moe_jax.cli.compile_check --config=configs/sigma_moe_tiny.py \\
      --topology=v5p:4x4x4 [--config.train.batch_size=... --config.mesh.fsdp=...]
  python -m sigma_moe_jax.cli.compile_check --config=configs/gpu_small.py \\
      --platform=cuda --gpu=h100 [--gpus=8]

Both compile the real train step (model, mesh, shardings, kernels) with the real compiler for
devices this host does not have, and print XLA's per-device memory against the device's memory,
the model FLOPs and tokens per step, compile time and the kernels in the compiled program.

TPU (`pip install -r requirements-tpu.txt`, not a TPU): XLA:TPU for the topology's devices.
CUDA (`pip install --no-deps -r requirements-gpu-aot.txt`, not a GPU; JAX_PLATFORMS=cpu): XLA:GPU
for `--gpus` devices of one host (default: as many as the config's mesh names) of a GPU in
`sigma_moe_jax/gpu_targets` (h100, h200, a100, rtx4090) or an XLA GpuTargetConfig file.

Exits non-zero when XLA's total exceeds `--headroom` (default 90%) of the device's memory, when a
kernel the target should get is missing, or when a ragged_dot is left to XLA (dense on GPUs).
"""

import dataclasses
import math
import sys

from absl import flags
from ml_collections import config_flags

from sigma_moe_jax import attention
from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.infra import aot, platform, sharding
from sigma_moe_jax.infra.metrics import flops_per_token
from sigma_moe_jax.moe import grouped_matmul
from sigma_moe_jax.training.settings import from_config, step_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_PLATFORM = flags.DEFINE_enum("platform", "tpu", ["tpu", "cuda"], "Target platform.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4.")
_GPU = flags.DEFINE_string("gpu", "h100", f"GPU: one of {aot.GPU_TARGETS}, or the path of an "
                           "XLA GpuTargetConfig text proto.")
_GPUS = flags.DEFINE_integer("gpus", 0, "GPUs to compile for (one host); 0: the product of the "
                             "config's fixed mesh sizes.")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "Largest share of the device's memory XLA's "
                               "per-device total may take.")
flags.mark_flag_as_required("config")

GB = 1e9


def check(settings, devices, label: str, hbm_bytes=None) -> bool:
  mesh = sharding.make_mesh(**dataclasses.asdict(settings.mesh), devices=devices)
  shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items() if size > 1)
  t = settings.train
  print(f"compiling the train step for {label} ({len(devices)} x {devices[0].device_kind}), "
        f"mesh {shape or 'one device'}, batch {t.batch_size} x {t.seq_len} "
        f"(grad_accum {t.grad_accum}) ...", flush=True)
  report = aot.compile_train_step(step_plan(settings), mesh, hbm_bytes)
  m = report.memory
  print(f"lower {report.lower_seconds:.0f} s, compile {report.compile_seconds:.0f} s")
  print(f"per device (GB): arguments {m['arguments'] / GB:.2f}, outputs {m['outputs'] / GB:.2f}"
        f" (aliased {m['aliased'] / GB:.2f}), temporaries {m['temporaries'] / GB:.2f}, code "
        f"{m['code'] / GB:.3f}; total {m['total'] / GB:.2f}"
        + (f" of {report.hbm_bytes / GB:.1f} ({m['total'] / report.hbm_bytes:.0%})"
           if report.hbm_bytes else ""))
  top_k = None if settings.schedule is None else settings.schedule.per_layer[0]
  tokens = t.batch_size * t.seq_len
  model_flops = flops_per_token(settings.model, t.seq_len, top_k) * tokens
  print(f"tokens per step {tokens:,}; model FLOPs per step (6 x activated parameters + "
        f"attention, first schedule phase): {model_flops:.3e}")
  if report.flops_per_device:
    # XLA counts a loop body once: the gradient-accumulation scan runs grad_accum times.
    print(f"XLA's count: {report.flops_per_device * report.devices:.3e} in all "
          f"({report.flops_per_device:.3e} per device), with the gradient-accumulation loop "
          f"counted once (x{t.grad_accum}) and Pallas kernels without a cost estimate (splash) "
          f"left out")
  print(f"kernels: {', '.join(report.kernels) or 'none'}")
  if report.collectives:
    print("collectives: " + ", ".join(f"{op} x{n}" for op, n in report.collectives.items())
          + (" (ragged_all_to_all in the lowered program)" if report.ragged_all_to_all else ""))
  ok = True
  if report.hbm_bytes and m["total"] > _HEADROOM.value * report.hbm_bytes:
    print(f"error: the step needs {m['total'] / GB:.1f} GB per device, more than "
          f"{_HEADROOM.value:.0%} of the device's {report.hbm_bytes / GB:.1f} GB")
    ok = False
  if report.dense_ragged_dot and settings.model.dispatch == "ragged":
    print("error: a ragged_dot is left to XLA, which computes it densely (every expert on "
          "every row); set model.grouped_matmul to a kernel or auto")
    ok = False
  return _expected_kernels(settings.model, report.kernels, platform.of_device(devices[0]),
                           t.seq_len) and ok


def _expected_kernels(model, kernels, target: platform.Target, seq_len: int) -> bool:
  """With `auto` kernels, the ones the target should get must be in the program."""
  expected = []
  if model.dispatch == "ragged" and model.grouped_matmul == "auto":
    backend = grouped_matmul.resolve("auto", target, model.dtype, model.d_model, model.d_ff)
    expected.append({"megablox": "gmm", "mosaic_gpu": "mosaic_gpu",
                     "triton": "triton:_triton_gmm_kernel"}.get(backend, backend))
  if model.attention == "auto":
    impl = attention.resolve("auto", target, model.dtype, seq_len, model.head_dim)
    expected.append({"splash": "splash_mha", "cudnn": "__cudnn$fmha"}.get(impl))
  missing = [e for e in expected if e and not any(k.startswith(e) for k in kernels)]
  if missing:
    print(f"error: expected kernels missing from the program: {', '.join(missing)}")
  return not missing


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    settings = from_config(_CONFIG.value)
    if _PLATFORM.value == "tpu":
      ok = check(settings, aot.tpu_devices(_TOPOLOGY.value), _TOPOLOGY.value)
    else:
      count = _GPUS.value or math.prod(
          size for size in dataclasses.asdict(settings.mesh).values() if size > 0)
      ok = check(settings, aot.gpu_devices(_GPU.value, count), _GPU.value,
                 aot.gpu_memory_bytes(_GPU.value))
  except ValueError as e:
    sys.exit(f"error: {e}")
  if not ok:
    sys.exit(1)


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
