"""Checks a training config against the hardware it is meant for, before launching it there.

  python -m experiments.compile_check --config=experiments/configs/sigma_moe_tiny.py \\
      --topology=v5p:4x4x4 [--config.train.batch_size=... --config.mesh.fsdp=...]
  python -m experiments.compile_check --config=experiments/configs/gpu_small.py --platform=cuda

TPU (needs `pip install -r requirements-tpu.txt`, not a TPU): compiles the real train step (model,
mesh, shardings, kernels) with XLA:TPU for the topology's devices and prints per-device memory
from XLA against the chip's HBM, model FLOPs per step from XLA's cost analysis, compile time and
the Pallas kernels in the compiled program. CUDA: exports the step with `jax.export` for one
Hopper GPU and prints the custom calls (kernels) of the exported program. Exits non-zero when the
step does not fit or an expected kernel is missing.
"""

import dataclasses
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli as cli_lib
from experiments.settings import flag_names, from_config, step_plan
from sigma_moe_jax import aot, sharding
from sigma_moe_jax.metrics import flops_per_token

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_PLATFORM = flags.DEFINE_enum("platform", "tpu", ["tpu", "cuda"], "Target platform.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "TPU topology, e.g. v5p:4x4x4.")
flags.mark_flag_as_required("config")

GB = 1e9


def check_tpu(settings, topology: str) -> bool:
  devices = aot.tpu_devices(topology)
  mesh = sharding.make_mesh(**dataclasses.asdict(settings.mesh), devices=devices)
  shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items() if size > 1)
  print(f"compiling the train step for {topology} ({len(devices)} x {devices[0].device_kind}), "
        f"mesh {shape or 'one device'}, batch {settings.train.batch_size} x "
        f"{settings.train.seq_len} ...", flush=True)
  report = aot.compile_train_step(step_plan(settings), mesh)
  m = report.memory
  print(f"lower {report.lower_seconds:.0f} s, compile {report.compile_seconds:.0f} s")
  print(f"per device (GB): arguments {m['arguments'] / GB:.2f}, outputs {m['outputs'] / GB:.2f}"
        f" (aliased {m['aliased'] / GB:.2f}), temporaries {m['temporaries'] / GB:.2f}, code "
        f"{m['code'] / GB:.3f}; total {m['total'] / GB:.2f}"
        + (f" of {report.hbm_bytes / GB:.0f}" if report.hbm_bytes else ""))
  t = settings.train
  top_k = None if settings.schedule is None else settings.schedule.per_layer[0]
  model_flops = flops_per_token(settings.model, t.seq_len, top_k) * t.batch_size * t.seq_len
  print(f"model FLOPs per step (6 x activated parameters + attention, first schedule phase): "
        f"{model_flops:.3e}")
  if report.flops_per_device:
    # XLA counts a loop body once: the gradient-accumulation scan runs grad_accum times.
    print(f"XLA's count: {report.flops_per_device * report.devices:.3e} in all "
          f"({report.flops_per_device:.3e} per device), with the gradient-accumulation loop "
          f"counted once (x{t.grad_accum}) and Pallas kernels without a cost estimate (splash) "
          f"left out")
  print(f"kernels: {', '.join(report.kernels) or 'none'}")
  ok = report.hbm_bytes is None or m["total"] <= report.hbm_bytes
  if not ok:
    print(f"error: the step needs {m['total'] / GB:.1f} GB per device, more than the chip's "
          f"{report.hbm_bytes / GB:.0f} GB")
  return ok and _expected_kernels(settings.model, report.kernels, "tpu")


def check_cuda(settings) -> bool:
  print(f"exporting the train step for a Hopper GPU, batch {settings.train.batch_size} x "
        f"{settings.train.seq_len} ...", flush=True)
  report = aot.export_train_step(step_plan(settings))
  print(f"export {report.export_seconds:.0f} s for {report.target}")
  print(f"custom calls: {', '.join(report.kernels) or 'none'}")
  if report.dense_ragged_dot:
    print("warning: a ragged_dot is left to XLA, which lowers it densely on GPUs")
  return _expected_kernels(settings.model, report.kernels, "cuda")


def _expected_kernels(model, kernels, target: str) -> bool:
  """With `auto` kernels, the ones the target should get must be in the program."""
  expected = []
  if model.dispatch == "ragged" and model.grouped_matmul == "auto":
    expected.append("gmm" if target == "tpu" else "mosaic_gpu")
  if model.attention == "auto":
    expected.append("splash_mha" if target == "tpu" else "__cudnn$fmha")
  missing = [e for e in expected if not any(k.startswith(e) for k in kernels)]
  if missing:
    print(f"error: expected kernels missing from the program: {', '.join(missing)}")
  return not missing


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:
    with flag_names():
      settings = from_config(_CONFIG.value)
      ok = (check_tpu(settings, _TOPOLOGY.value) if _PLATFORM.value == "tpu"
            else check_cuda(settings))
  except ValueError as e:
    sys.exit(f"error: {e}")
  if not ok:
    sys.exit(1)


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
