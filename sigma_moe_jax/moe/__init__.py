"""The mixture-of-experts layer and its parts.

  layer.py            MoE(MoEConfig): the router, the experts, one shard_map over the mesh
  routing.py          float32 router scores and the top-k choice under a static maximum
  dispatch.py         tokens to their experts: ragged, padded (capacity), dense (the test oracle)
  grouped_matmul.py   the ragged dispatch's kernels per platform
  expert_parallel.py  experts split over the `expert` mesh axis
  balancing.py        routing counts, the balancing losses, loss-free bias, routing metrics
"""

from sigma_moe_jax.moe.layer import MoE, MoEConfig, gathered_experts

__all__ = ["MoE", "MoEConfig", "gathered_experts"]
