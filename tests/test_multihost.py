"""Two processes on localhost (4 fake CPU devices each, gloo collectives) train like one process
with 8 devices, read distinct documents, and save and resume checkpoints together."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
import numpy as np
from jax.sharding import NamedSharding

from configs import cpu_tiny
from sigma_moe_jax.data.pipeline import make_pipeline
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.run import build_training

pytestmark = pytest.mark.integration  # launches processes (see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Constant learning rate after warm-up, so that a run of 4 steps resumed to 6 sees the same
# schedule as one run of 6.
OVERRIDES = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
             "model.num_kv_heads": 1, "model.head_dim": 16, "model.num_experts": 8,
             "model.d_ff": 32, "train.batch_size": 8, "train.seq_len": 32,
             "train.warmup_steps": 2, "train.min_lr_ratio": 1.0, "train.log_every": 1,
             "train.eval_every": 1000, "train.eval_batches": 1, "train.checkpoint_every": 2,
             "train.peak_flops": 1e12, "mesh.data": 4, "mesh.expert": 2}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_two(workdir, steps, wait=True):
  port = free_port()
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": steps}.items()]
  procs = []
  for pid in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "sigma_moe_jax.cli.train", "--config=configs/cpu_tiny.py",
         f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  if not wait:
    return procs
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def one_process_losses(steps):
  """The same run in this process on 8 devices, its global batch made of both processes'
  document shards."""
  config = cpu_tiny.get_config()
  config.update_from_flattened_dict({**OVERRIDES, "train.steps": steps})
  built = build_training(config)
  shards = [make_pipeline(built.inputs.train_docs, built.inputs.tokenizer, seq_len=32,
                          batch_size=4, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  graphdef, state, _ = train_lib.init_sharded_state(built.settings.model, 0, built.optimizer,
                                                    built.mesh)
  step = jax.jit(train_lib.make_train_step(graphdef, built.optimizer, built.lr,
                                           built.settings.model, built.settings.balance))
  batch_sharding = NamedSharding(built.mesh, sharding.batch_spec(built.mesh))
  losses, first_docs = [], []
  with jax.set_mesh(built.mesh):
    for _ in range(steps):
      parts = [next(it) for it in shards]
      first_docs.append([p["tokens"][0, :8].tolist() for p in parts])
      batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), batch_sharding)
               for k in parts[0]}
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return losses, first_docs


def test_two_processes_train_like_one_and_resume_together(tmp_path):
  workdir = tmp_path / "run"
  launch_two(workdir, steps=4)
  assert {"2", "4"} <= set(os.listdir(workdir / "checkpoints"))
  outputs = launch_two(workdir, steps=6)
  assert all("resumed from step 4" in out for out, _ in outputs)
  by_step = {}
  with open(workdir / "metrics.jsonl") as f:  # written by process 0 only
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record["loss"]
  want, first_docs = one_process_losses(6)
  assert sorted(by_step) == list(range(1, 7))
  np.testing.assert_allclose([by_step[s] for s in range(1, 7)], want, rtol=1e-5)
  # The two processes read different documents.
  assert all(a != b for a, b in first_docs)


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  """Preemption of one host: every process stops at the same step, after saving it together."""
  workdir = tmp_path / "run"
  procs = launch_two(workdir, steps=200, wait=False)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  lasts = [err.strip().splitlines()[-1] for _, err in outputs]
  assert all(p.returncode != 0 for p in procs), lasts
  assert lasts[1].startswith("error: stopped by SIGTERM at step "), lasts
  assert lasts[0].startswith("error: stopped by a signal to another process of the run at step")
  steps = {int(line.split("at step ")[1].split(";")[0]) for line in lasts}
  assert len(steps) == 1 and (workdir / "checkpoints" / str(steps.pop())).is_dir()
