"""A lowering failure fails here, not on the pod: a tiny model's train step compiled by the real
XLA:TPU compiler for a v5p topology (libtpu, no TPU needed) and exported for a Hopper GPU, with
the accelerator kernels inside."""

import functools
import os
import subprocess
import sys

import optax
import pytest

from sigma_moe_jax import ModelConfig, TopKSchedule, aot, sharding
from sigma_moe_jax import train as train_lib

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


def test_compile_check_refuses_an_unknown_topology_in_one_line():
  pytest.importorskip("libtpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compile_check",
       "--config=experiments/configs/cpu_tiny.py", "--topology=v5p:3x3x3x3"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot describe TPU topology 'v5p:3x3x3x3'"), result.stderr[-2000:]
