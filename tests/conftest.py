import os
import shutil
import tempfile

# Tests run on the CPU; several need 8 devices (meshes). Set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the whole test run, the launched subprocesses included
# (they inherit the environment): the launches of the same tiny config, and steps rebuilt from
# the same config in several tests, compile once. Fresh for every run, removed at its end; a
# cache given in the environment is used as it is and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sigma-moe-jax-compiles-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
