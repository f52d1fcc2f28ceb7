"""The training launcher as a user runs it: bad input, another mesh, init_from, another cwd."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # launches processes (see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.head_dim=16", "--config.model.num_experts=8",
        "--config.model.d_ff=32", "--config.train.batch_size=4", "--config.train.seq_len=32",
        "--config.train.warmup_steps=2", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=3", "--config.train.peak_flops=1e12"]


def launch(workdir, *overrides, devices=1, wait=True, cwd=ROOT,
           config="configs/cpu_tiny.py"):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "-m", "sigma_moe_jax.cli.train",
         f"--config={config}", f"--workdir={workdir}", *TINY, *overrides]
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def own_lines(stderr):
  """stderr without what the CUDA plugin (requirements-gpu-aot.txt, installed in CI) logs when
  jax starts on a host without CUDA, whatever JAX_PLATFORMS says."""
  return [line for line in stderr.strip().splitlines()
          if "cudart_stub.cc" not in line and "absl::InitializeLog()" not in line]


def losses(workdir):
  """Per-step loss, the last record of each step winning (a resumed run repeats steps)."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record["loss"]
  return by_step


def test_bad_input_gives_one_clear_error(tmp_path):
  code, out, err = launch(tmp_path / "run", "--config.data.path=/nonexistent/*.txt", devices=2)
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and "no data file matches" in last, err[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


# The same refusals from the library call the launcher makes (one process for them all). The
# tiny model of TINY, 8 rows a batch to split over this process's 8 devices.
TINY_CONFIG = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
               "model.num_kv_heads": 1, "model.head_dim": 16, "model.num_experts": 8,
               "model.d_ff": 32, "train.batch_size": 8, "train.seq_len": 32}


@pytest.mark.parametrize("overrides,message", [
    ({"model.vocab_size": 100}, "4096"),
    ({"train.batch_size": 3}, "does not split"),
    ({"train.steps": 0}, "train.steps must be >= 1"),
    ({"schedule.top_k": "[1]*5"}, "expected num_layers=2"),
    ({"model.gate_fn": "relu"}, "model.gate_fn: must be one of"),
    ({"train.init_from": "/nonexistent/run"}, "no checkpoints directory"),
    ({"data.eval_sets": "python"}, "not name=paths"),
    ({"data.rows_by_path": True}, "data.rows_by_path needs several"),
    ({"train.stpes": 5}, "did you mean train.steps?"),
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, overrides, message):
  from sigma_moe_jax import train
  from sigma_moe_jax.training.run_config import load_config
  config = load_config(os.path.join(ROOT, "configs", "cpu_tiny.py")).to_dict()
  for key, value in {**TINY_CONFIG, **overrides}.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train(config, str(tmp_path / "run"))
  checkpoints = tmp_path / "run" / "checkpoints"
  assert not checkpoints.exists() or not os.listdir(checkpoints)


def test_launcher_runs_from_another_directory(tmp_path):
  """The installed package finds its shipped config, corpus and tokenizer from any directory;
  a relative workdir is taken from where the command runs."""
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  code, _, err = launch("run", "--config.train.steps=3", cwd=elsewhere)
  assert code == 0, err[-2000:]
  assert losses(elsewhere / "run") and (elsewhere / "run" / "checkpoints").is_dir()


def test_one_file_corpus_is_validated_and_says_what_it_held_out(tmp_path):
  """One big .txt file is one document: the run holds out pieces of it, says so once, and logs
  val_loss at every eval_every; with val_fraction 0 it says validation is off."""
  import gzip
  with gzip.open(os.path.join(ROOT, "data", "shakespeare.jsonl.gz"), "rt") as f:
    text = "".join(json.loads(line)["text"] for _, line in zip(range(3), f))
  (tmp_path / "book.txt").write_text(text)
  code, out, err = launch(tmp_path / "run", "--config.train.steps=4",
                          "--config.train.eval_every=2", f"--config.data.path={tmp_path}/book.txt")
  assert code == 0, err[-2000:]
  said = [line for line in out.splitlines() if line.startswith("validation:")]
  assert len(said) == 1 and "pieces held out" in said[0] and "book.txt (1 document)" in said[0]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    evals = [r["step"] for r in map(json.loads, f) if "val_loss" in r]
  assert evals == [2, 4], evals
  code, out, err = launch(tmp_path / "off", "--config.train.steps=3",
                          "--config.data.val_fraction=0", f"--config.data.path={tmp_path}/book.txt")
  assert code == 0, err[-2000:]
  assert "validation: off (data.val_fraction=0)" in out.splitlines()


def test_unknown_config_key_is_rejected(tmp_path):
  code, _, err = launch(tmp_path / "run", "--config.train.stepz=3")
  assert code != 0
  assert own_lines(err) == [
      "error: unknown config key 'train.stepz'; did you mean train.steps?"], err[-2000:]
  assert not (tmp_path / "run").exists()
  code, _, err = launch(tmp_path / "run", "--config=configs/no_such.py")
  assert code != 0 and err.strip().splitlines()[-1].startswith("error: config file")


def test_incompatible_checkpoint_is_left_untouched(tmp_path):
  workdir = tmp_path / "run"
  code, _, err = launch(workdir, "--config.train.steps=3")
  assert code == 0, err[-2000:]
  before = sorted(str(p.relative_to(workdir)) + str(p.stat().st_mtime_ns)
                  for p in (workdir / "checkpoints").rglob("*"))
  code, _, err = launch(workdir, "--config.train.steps=6", "--config.model.d_ff=64")
  assert code != 0
  assert "incompatible config" in err and "model.d_ff" in err
  after = sorted(str(p.relative_to(workdir)) + str(p.stat().st_mtime_ns)
                 for p in (workdir / "checkpoints").rglob("*"))
  assert after == before


def test_resume_onto_a_different_mesh(tmp_path):
  """Saved on data 2 x expert 2 (4 devices), resumed on 2 devices with data 2."""
  workdir = tmp_path / "run"
  code, _, err = launch(workdir, "--config.train.steps=3", "--config.mesh.expert=2",
                        devices=4)
  assert code == 0, err[-2000:]
  code, out, err = launch(workdir, "--config.train.steps=5", devices=2)
  assert code == 0, err[-2000:]
  assert "resumed from step 3" in out
  assert sorted(losses(workdir)) == [1, 2, 3, 4, 5]


def test_init_from_continues_another_run(tmp_path):
  """A run started from another's step-3 checkpoint retraces that run's steps 4-6 exactly (state,
  step and data position carry over); a step the source does not have is refused."""
  source, branch = tmp_path / "source", tmp_path / "branch"
  code, _, err = launch(source, "--config.train.steps=6")
  assert code == 0, err[-2000:]
  saved = sorted(os.listdir(source / "checkpoints"))
  code, _, err = launch(branch, "--config.train.steps=6", f"--config.train.init_from={source}",
                        "--config.train.init_step=2")
  assert code != 0 and "no checkpoint at step 2" in err.strip().splitlines()[-1]
  code, out, err = launch(branch, "--config.train.steps=6", f"--config.train.init_from={source}",
                          "--config.train.init_step=3")
  assert code == 0, err[-2000:]
  assert "initialized from step 3" in out
  got, want = losses(branch), losses(source)
  assert sorted(got) == [4, 5, 6]
  assert sorted(os.listdir(source / "checkpoints")) == saved  # the source is only read
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], atol=1e-6, rtol=0)


def test_sft_starts_from_the_parameters_and_refuses_a_resume_with_other_sft_settings(tmp_path):
  """A chat run from a pre-trained run's parameters begins at step 0 with its own data stream and
  validates on the held-out conversations; resuming it under other SFT settings is refused
  naming them."""
  source, sft = tmp_path / "source", tmp_path / "sft"
  code, _, err = launch(source, "--config.train.steps=3")
  assert code == 0, err[-2000:]
  chat = ["--config.train.steps=3",
          "--config.train.seq_len=128", "--config.train.eval_every=3",
          f"--config.train.init_from={source}"]
  sft_config = "configs/sft_cpu_tiny.py"
  code, out, err = launch(sft, *chat, config=sft_config)
  assert code == 0, err[-2000:]
  assert "initialized from step 3" in out and "(parameters only)" in out
  with open(sft / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert any("heldout_val_loss" in r for r in records)
  # Only reply tokens are targets: far fewer than the tokens of a step.
  assert all(r["targets"] < 0.3 * 4 * 128 for r in records if "targets" in r)
  code, _, err = launch(sft, *chat, "--config.train.steps=4", "--config.data.truncate=True",
                        config=sft_config)
  assert code != 0 and "data.truncate: checkpoint False, config True" in err
