"""sigma-moe-jax: Sigma-MoE-Tiny, a 96-expert top-1 mixture-of-experts LM, in JAX and Flax NNX."""

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.model import Transformer
from sigma_moe_jax.balancing import MoEStats
from sigma_moe_jax.moe import MoE
from sigma_moe_jax.params import count_params
from sigma_moe_jax.schedule import TopKSchedule

__all__ = ["ModelConfig", "Transformer", "MoE", "MoEStats", "count_params", "TopKSchedule"]
