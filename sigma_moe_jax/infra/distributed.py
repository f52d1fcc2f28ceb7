"""Multi-host runs: `jax.distributed` set up from the environment."""

import os

import jax


def maybe_initialize():
  """Multi-host when the environment says so. JAX_COORDINATOR_ADDRESS (host:port),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the run explicitly; a multi-task SLURM job or a
  multi-host TPU slice is detected by `jax.distributed.initialize()` itself. Single-host runs
  skip it."""
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    # CPU processes exchange collectives over gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif (int(env.get("SLURM_NTASKS", "1")) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1):
    jax.distributed.initialize()
