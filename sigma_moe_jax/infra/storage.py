"""One way to reach files, on a local disk or in a `gs://` bucket.

Every path the project reads or writes (workdirs, checkpoints, metrics, TensorBoard events,
data files and globs, tokenizers, `init_from`, exports) goes through this module. It is a thin
layer over `etils.epath`, the path type Orbax itself uses: local paths take the `os` backend,
`gs://` paths take `gcsfs` through fsspec, authenticated by application default credentials
(`gcloud auth application-default login`, or the VM's service account on a TPU VM).
`STORAGE_EMULATOR_HOST` (gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (Orbax's arrays) point both at
another GCS-API server.

Object stores have no append and no rename: `Appender` rewrites an object from a local copy on
`flush` (local files are appended to as usual), and `move` copies then deletes.
"""

from __future__ import annotations

import glob as _glob
import gzip
import io
import math
import os
import time
import uuid
from typing import IO, List, Optional

import fsspec
from etils import epath

REMOTE_SCHEMES = ("gs://",)

# gcsfs caches directory listings for the life of a process; files that Orbax writes through
# tensorstore (another client) would then stay invisible to listings here. Set before the first
# gs:// filesystem is made; explicit settings (FSSPEC_GCS_* variables) win.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


# The source checkout (the folder holding this package): the shipped configs, corpus and
# tokenizer are found from there when a relative path matches nothing in the current directory.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def is_remote(path: str) -> bool:
  return str(path).startswith(REMOTE_SCHEMES)


def resolve(path: str) -> str:
  """The path to store and compare: absolute for a local path, unchanged for a bucket."""
  path = str(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  if is_remote(path):
    return "/".join([str(path).rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(path, *parts)


def basename(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
  if is_remote(path):
    return str(path).rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(path)


def as_epath(path: str) -> epath.Path:
  """The `epath.Path` of `path`, the form Orbax and grain take."""
  return epath.Path(resolve(path))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: str) -> List[str]:
  """Names in a directory (empty when it does not exist)."""
  directory = epath.Path(path)
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir())


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str, mode: str = "r") -> IO:
  """Opens `path` ("r", "w", "a", with "b" for bytes); a `.gz` file is decompressed on read and
  compressed on write."""
  binary, base = "b" in mode, mode.replace("t", "").replace("b", "")
  if str(path).endswith(".gz"):
    raw = epath.Path(path).open(base + "b")
    compressed = gzip.GzipFile(fileobj=raw, mode=base + "b")
    compressed.myfileobj = raw  # closed with it
    return compressed if binary else io.TextIOWrapper(compressed, encoding="utf-8")
  return epath.Path(path).open(base + ("b" if binary else ""))


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Replaces the file's content in one piece: through a temporary file renamed over it on a
  local disk; an object upload is already all-or-nothing."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """`write_text` for bytes."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def move(source: str, target: str) -> None:
  """Moves a file or directory (in a bucket: copied, then deleted)."""
  if is_remote(source) or is_remote(target):
    # The filesystem instance epath uses for gs:// (fsspec caches instances by their
    # arguments), so that its cached listings see the move.
    fsspec.filesystem("gcs", finalize_on_close=True).mv(source, target, recursive=True)
    return
  os.replace(source, target)


def glob(pattern: str) -> List[str]:
  """Sorted paths of the files that match `pattern` (`*`, `?`, `[...]`; `**` crosses
  directories). A bucket is listed under the pattern's fixed prefix only."""
  if not any(c in pattern for c in "*?["):
    return [pattern] if isfile(pattern) else []
  if not is_remote(pattern):
    return sorted(m for m in _glob.glob(pattern, recursive=True) if os.path.isfile(m))
  parts = pattern.split("/")
  fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  root, rest = "/".join(parts[:fixed]), "/".join(parts[fixed:])
  return sorted(str(p) for p in epath.Path(root).glob(rest) if p.is_file())


def check_writable(directory: str) -> Optional[str]:
  """None when a file can be created and deleted under `directory` (created if missing), else
  the reason, in one line."""
  probe = join(directory, f".write-probe-{uuid.uuid4().hex[:8]}")
  try:
    makedirs(directory)
    epath.Path(probe).write_text("ok")
    epath.Path(probe).unlink()
  except Exception as e:  # noqa: BLE001 -- any failure here is the answer
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"
  return None


class Appender:
  """A file that grows by appends and survives a crash up to its last `flush`.

  Locally each `write` appends and flushes at once. In a bucket the whole content is kept and
  the object rewritten by `flush`, at most once every `min_interval` seconds unless `force`d; a
  preempted host then loses what was written since the last flush (a resumed run writes the
  steps past its checkpoint again anyway). `binary` takes bytes instead of text.
  """

  def __init__(self, path: str, min_interval: float = 30.0, binary: bool = False):
    self.path, self.min_interval, self.binary = path, min_interval, binary
    self.remote = is_remote(path)
    self._buffer = io.BytesIO() if binary else io.StringIO()
    # -inf, not 0: monotonic time starts near 0 at boot, and the first write must always flush.
    self._dirty, self._last_flush = False, -math.inf
    if self.remote and exists(path):
      self._buffer.write(read_bytes(path) if binary else read_text(path))

  def write(self, data) -> None:
    if not self.remote:
      with open(self.path, "ab" if self.binary else "a") as f:
        f.write(data)
      return
    self._buffer.write(data)
    self._dirty = True
    self.flush()

  def flush(self, force: bool = False) -> None:
    if not (self.remote and self._dirty):
      return
    if not force and time.monotonic() - self._last_flush < self.min_interval:
      return
    target = epath.Path(self.path)
    if self.binary:
      target.write_bytes(self._buffer.getvalue())
    else:
      target.write_text(self._buffer.getvalue())
    self._dirty, self._last_flush = False, time.monotonic()

  def close(self) -> None:
    self.flush(force=True)


def project_path(path: str) -> str:
  """`path` itself, unless it is relative, matches nothing here, and matches from the project
  root (globs and comma-separated lists are resolved part by part). So the shipped configs,
  corpus and tokenizer are found whatever the current directory."""
  def one(part: str) -> str:
    part = part.strip()
    if not part or os.path.isabs(part) or is_remote(part) or glob(part):
      return part
    rooted = os.path.join(PROJECT_ROOT, part)
    return rooted if glob(rooted) else part
  return ",".join(one(p) for p in path.split(",")) if path else path
