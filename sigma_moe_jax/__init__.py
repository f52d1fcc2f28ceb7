"""sigma-moe-jax: Sigma-MoE-Tiny, a 96-expert top-1 mixture-of-experts LM, in JAX and Flax NNX.

The model: `ModelConfig`, `Transformer`, `MoE`, `count_params`, `TopKSchedule`. Training:
`train(config, workdir)` runs a whole run and returns its state; `fit(state, step_fn, batches,
until=..., hooks=...)` is the loop under it (`sigma_moe_jax.training`).
"""

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.model import Transformer
from sigma_moe_jax.moe.balancing import MoEStats
from sigma_moe_jax.moe.layer import MoE, MoEConfig
from sigma_moe_jax.params import count_params
from sigma_moe_jax.schedule import TopKSchedule

__all__ = ["ModelConfig", "Transformer", "MoE", "MoEConfig", "MoEStats", "count_params",
           "TopKSchedule", "train", "fit"]


def __getattr__(name):
  # The training entry points import the data and checkpoint libraries: only when asked for.
  if name == "train":
    from sigma_moe_jax.training.run import train  # noqa: PLC0415
    return train
  if name == "fit":
    from sigma_moe_jax.training.loop import fit  # noqa: PLC0415
    return fit
  raise AttributeError(f"module 'sigma_moe_jax' has no attribute {name!r}")
