"""A lowering failure fails here, not on the pod: a tiny model's train step compiled by the real
XLA:TPU compiler for a v5p topology (libtpu, no TPU needed) and by the real XLA:GPU compiler for
H100s and an A100 (the CUDA plugin, no GPU needed), and exported for a Hopper GPU, with the
accelerator kernels inside, chosen from the devices compiled for (nothing forced)."""

import functools
import os
import subprocess
import sys

import optax
import pytest

from sigma_moe_jax import ModelConfig, TopKSchedule
from sigma_moe_jax.infra import aot, platform, sharding
from sigma_moe_jax.training import step as train_lib

# Sizes the kernels accept: sequence a multiple of 128 (splash), 16-bit compute and widths that
# are multiples of 128 (Mosaic GPU). Two layers at top-2 then top-1 exercise the slot buckets.
CFG = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=32, num_experts=8, d_ff=128, top_k=1, dispatch="ragged",
                  dtype="bfloat16", remat="full", max_top_k=(2, 1))


def plan(batch_size, model=CFG):
  lr = optax.constant_schedule(1e-3)
  return aot.StepPlan(model=model, schedule=TopKSchedule.parse("[2,1]", 2),
                      balance=train_lib.BalanceSettings(), optimizer=train_lib.make_optimizer(lr),
                      lr=lr, batch_size=batch_size, seq_len=128)


@functools.lru_cache(maxsize=None)
def tpu_report():
  pytest.importorskip("libtpu")
  devices = aot.tpu_devices("v5p:2x2x1")
  mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, devices=devices)
  return aot.compile_train_step(plan(batch_size=8), mesh)


def test_train_step_compiles_for_tpu_with_megablox_and_splash():
  report = tpu_report()
  assert report.target == "tpu" and report.devices == 4 and report.device_kind == "TPU v5"
  kernels = set(report.kernels)
  assert {"gmm", "tgmm"} <= kernels, kernels  # grouped matmul forward and weight gradient
  assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
  assert any(k.startswith("splash_mha_dkv") for k in kernels), kernels
  assert 0 < report.memory["total"] < report.hbm_bytes
  assert report.flops_per_device > 0


def gpu_devices(gpu, count):
  try:
    return aot.gpu_devices(gpu, count)
  except ValueError as e:  # the CUDA plugin is missing: requirements-gpu-aot.txt
    pytest.skip(str(e))


def test_shipped_gpu_targets_describe_their_cards():
  for gpu, kind, capability, cores, memory in [
      ("h100", "NVIDIA H100 80GB HBM3", "9.0", 132, 84942979072),
      ("h200", "NVIDIA H200 141GB HBM3e", "9.0", 132, 151397597184),
      ("a100", "NVIDIA A100-SXM4-80GB", "8.0", 108, 85100068864),
      ("rtx4090", "NVIDIA GeForce RTX 4090", "8.9", 128, 25757220864)]:
    device = gpu_devices(gpu, 1)[0]
    assert device.device_kind == kind
    assert platform.of_device(device) == platform.Target("gpu", capability, cores)
    assert aot.gpu_memory_bytes(gpu) == memory


def test_train_step_compiles_for_h100s_with_mosaic_gpu_cudnn_and_ragged_all_to_all():
  """Two H100s with the experts split between them and the dropless exchange: the Hopper
  kernels and ragged_all_to_all come from the devices compiled for, not from this CPU host."""
  mesh = sharding.make_mesh(data=1, expert=2, devices=gpu_devices("h100", 2))
  model = CFG.replace(expert_exchange="ragged_all_to_all")
  report = aot.compile_train_step(plan(batch_size=4, model=model), mesh,
                                  aot.gpu_memory_bytes("h100"))
  assert report.target == "gpu" and report.device_kind == "NVIDIA H100 80GB HBM3"
  assert any(k.startswith("mosaic_gpu") for k in report.kernels), report.kernels
  assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(report.kernels)
  assert not report.dense_ragged_dot
  # Lowered as ragged_all_to_all; XLA:GPU compiles it into all-to-all operations.
  assert report.ragged_all_to_all and report.collectives.get("all-to-all", 0) > 0
  assert report.hbm_bytes == 84942979072
  # The state is donated: arguments and outputs alias, and the total counts them once.
  m = report.memory
  assert m["aliased"] > 0 and m["temporaries"] > 0
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
  assert m["total"] < 0.01 * report.hbm_bytes


def test_train_step_compiles_for_an_a100_with_the_triton_grouped_matmul():
  mesh = sharding.make_mesh(data=1, devices=gpu_devices("a100", 1))
  report = aot.compile_train_step(plan(batch_size=2), mesh, aot.gpu_memory_bytes("a100"))
  assert report.device_kind == "NVIDIA A100-SXM4-80GB"
  assert {"triton:_triton_gmm_kernel", "triton:_triton_tgmm_kernel"} <= set(report.kernels)
  assert not any(k.startswith(("mosaic_gpu", "__cudnn")) for k in report.kernels)
  assert not report.dense_ragged_dot  # dropless without XLA's dense ragged_dot
  assert not report.ragged_all_to_all  # one device: no exchange


def test_unknown_topology_is_one_clear_error():
  pytest.importorskip("libtpu")
  with pytest.raises(ValueError, match="cannot describe TPU topology 'v9z:1x1'"):
    aot.tpu_devices("v9z:1x1")


def test_train_step_exports_for_hopper_with_mosaic_gpu_and_cudnn():
  report = aot.export_train_step(plan(batch_size=2))
  assert any(k.startswith("mosaic_gpu") for k in report.kernels), report.kernels
  assert any(k.startswith("__cudnn$fmha") for k in report.kernels), report.kernels
  assert not report.dense_ragged_dot
  # The check can tell: XLA's ragged_dot, which lowers densely on GPUs, is seen when chosen.
  xla = aot.export_train_step(plan(batch_size=2, model=CFG.replace(grouped_matmul="xla")))
  assert xla.dense_ragged_dot and not any(k.startswith("mosaic_gpu") for k in xla.kernels)


@pytest.mark.integration
@pytest.mark.parametrize("flags,message", [
    (["--topology=v5p:3x3x3x3"], "error: cannot describe TPU topology 'v5p:3x3x3x3'"),
    (["--platform=cuda", "--gpu=gtx480"], "error: unknown GPU 'gtx480'"),
])
def test_compile_check_refuses_an_unknown_target_in_one_line(flags, message):
  if "--platform=cuda" not in flags:
    pytest.importorskip("libtpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "sigma_moe_jax.cli.compile_check",
       "--config=configs/cpu_tiny.py", *flags],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(message), result.stderr[-2000:]
