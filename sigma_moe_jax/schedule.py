"""Progressive sparsification: a per-layer top-k that changes with the step, traced under jit.

A schedule is a list of phases, each a start (a step, or a fraction of the run) and a per-layer
top-k. The per-layer top-k may be written as the authors' compact form, e.g.
"[8,8,6,6,4,4,2,2]+[1]*48", which is parsed here without `eval`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

PerLayer = Union[str, Sequence[int]]
_TERM = re.compile(r"\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]\s*(?:\*\s*(\d+))?$")


def parse_per_layer(spec: PerLayer) -> List[int]:
  """"[8,8]+[1]*3" -> [8, 8, 1, 1, 1]; a list or tuple of ints is returned as a list."""
  if not isinstance(spec, str):
    values = list(spec)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
      raise ValueError(f"per-layer top-k must be integers, got {spec!r}")
    return [int(v) for v in values]
  values = []
  for term in spec.split("+"):
    match = _TERM.match(term.strip())
    if match is None:
      raise ValueError(f"cannot parse per-layer top-k {spec!r}: expected terms like [8,8,6] or "
                       f"[1]*48 joined by '+'")
    items = [int(v) for v in match.group(1).split(",")]
    values += items * int(match.group(2) or 1)
  return values


def parse_phases(text: str) -> List[Tuple[Union[int, float], str]]:
  """"0:[8,8]+[1]*4; 0.9:[1]*6" -> [(0, "[8,8]+[1]*4"), (0.9, "[1]*6")], the one-line form
  used by config files and flags. A start with a '.' is a fraction of the run. A text without
  ':' is one phase from step 0."""
  phases = []
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    if ":" not in part:
      phases.append((0, part))
      continue
    start, per_layer = (v.strip() for v in part.split(":", 1))
    try:
      phases.append((float(start) if "." in start else int(start), per_layer))
    except ValueError:
      raise ValueError(f"top-k schedule phase {part!r}: start {start!r} is not a number") from None
  return phases


@dataclasses.dataclass(frozen=True)
class TopKSchedule:
  """Phases (start_step, per-layer top-k), sorted by start; the first starts at step 0."""

  starts: Tuple[int, ...]
  per_layer: Tuple[Tuple[int, ...], ...]

  @classmethod
  def parse(cls, spec: Union[PerLayer, Sequence[Tuple[Union[int, float], PerLayer]]],
            num_layers: int, total_steps: Optional[int] = None,
            num_experts: Optional[int] = None) -> "TopKSchedule":
    """spec: one per-layer top-k (one phase from step 0), or [(start, per_layer), ...] where
    start is an int step or a float fraction of `total_steps`."""
    if isinstance(spec, str) or (spec and all(isinstance(v, (int, np.integer)) for v in spec)):
      spec = [(0, spec)]
    if not spec:
      raise ValueError("top-k schedule has no phases")
    starts, per_layer = [], []
    for phase, item in enumerate(spec):
      try:
        start, layers = item
      except (TypeError, ValueError):
        raise ValueError(f"top-k schedule phase {phase}: expected (start, per_layer), "
                         f"got {item!r}") from None
      if isinstance(start, float):
        if total_steps is None:
          raise ValueError(f"top-k schedule phase {phase}: a fractional start ({start}) needs "
                           f"total_steps")
        if not 0.0 <= start <= 1.0:
          raise ValueError(f"top-k schedule phase {phase}: fraction {start} outside [0, 1]")
        start = int(round(start * total_steps))
      if not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"top-k schedule phase {phase}: start must be a step >= 0 or a "
                         f"fraction, got {start!r}")
      ks = parse_per_layer(layers)
      if len(ks) != num_layers:
        raise ValueError(f"top-k schedule phase {phase}: {len(ks)} per-layer entries, expected "
                         f"num_layers={num_layers}")
      if min(ks) < 1:
        raise ValueError(f"top-k schedule phase {phase}: top-k must be >= 1, got {min(ks)}")
      if num_experts is not None and max(ks) > num_experts:
        raise ValueError(f"top-k schedule phase {phase}: top-k {max(ks)} exceeds "
                         f"num_experts={num_experts}")
      starts.append(int(start))
      per_layer.append(tuple(ks))
    if starts[0] != 0:
      raise ValueError(f"top-k schedule: the first phase must start at step 0, not {starts[0]}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
      raise ValueError(f"top-k schedule: phase starts must increase strictly, got {starts}")
    return cls(tuple(starts), tuple(per_layer))

  @property
  def max_top_k(self) -> Tuple[int, ...]:
    """Static per-layer maximum over all phases: what the model must be built for."""
    return tuple(int(k) for k in np.max(np.asarray(self.per_layer), axis=0))

  @property
  def final(self) -> Tuple[int, ...]:
    return self.per_layer[-1]

  def top_k_at(self, step) -> jax.Array:
    """int32 [layers]: the top-k of each layer at `step` (a Python int or a traced scalar)."""
    phase = jnp.searchsorted(jnp.asarray(self.starts), step, side="right") - 1
    return jnp.asarray(self.per_layer, jnp.int32)[phase]


@dataclasses.dataclass(frozen=True)
class AdaptiveTopK:
  """A per-layer top-k that each layer lowers by itself once its top-1 routing is balanced.

  Every layer starts at `start[l]` experts per token and ends at `target[l]`. What decides is the
  load the layer would have at top-1: the share of tokens whose best-scored expert is each expert
  (`MoEStats.first_choice`, measured whatever k the layer runs at), in an exponential moving
  average over about `smoothing` steps, summarised by its most loaded expert,
  dev_l = max_i a_{l,i} * E - 1. A layer is *ready* while dev_l is at most the median of dev over
  all layers plus `threshold`: its top-1 routing is then no worse balanced than the model's
  typical layer. A layer lowers its k by one once it was ready at least `calm_fraction` of the
  last `patience` steps (all of them since its last change: a full window after each change;
  `calm_fraction` 1.0 is `patience` ready steps in a row); a layer whose dev exceeds the median
  by more than `raise_above` goes back up by one (never above its start).
  Whatever the load, a ceiling that falls linearly from `start` at step 0 to `target` at step
  `deadline` caps every layer, so all layers are at their target from `deadline` on. See
  docs/design.md, "Adaptive sparsification".

  The decisions are made inside the jitted train step from the psum-reduced counts, so every
  process takes the same ones, and k is traced, so no change recompiles. Their state
  (`init_state`) is part of the train state and is checkpointed with it.
  """

  start: Tuple[int, ...]
  target: Tuple[int, ...]
  deadline: int
  threshold: float = 0.0
  patience: int = 50
  smoothing: int = 10
  raise_above: float = 1.0
  calm_fraction: float = 1.0

  def __post_init__(self):
    if len(self.start) != len(self.target):
      raise ValueError(f"adaptive top-k: start has {len(self.start)} layers, target "
                       f"{len(self.target)}")
    if any(t < 1 or s < t for s, t in zip(self.start, self.target)):
      raise ValueError(f"adaptive top-k: every layer needs start >= target >= 1, got start "
                       f"{list(self.start)} and target {list(self.target)}")
    for name in ("deadline", "patience", "smoothing"):
      if not isinstance(getattr(self, name), (int, np.integer)) or getattr(self, name) < 1:
        raise ValueError(f"adaptive top-k: {name} must be a step count >= 1, got "
                         f"{getattr(self, name)!r}")
    if not 0 < self.calm_fraction <= 1:
      raise ValueError(f"adaptive top-k: calm_fraction must be in (0, 1], got "
                       f"{self.calm_fraction!r}")
    if self.raise_above <= self.threshold:
      raise ValueError(f"adaptive top-k: needs threshold < raise_above, got threshold "
                       f"{self.threshold} and raise_above {self.raise_above}")

  @property
  def max_top_k(self) -> Tuple[int, ...]:
    return tuple(self.start)

  @property
  def final(self) -> Tuple[int, ...]:
    return tuple(self.target)

  def ceiling(self, step) -> jax.Array:
    """int32 [layers]: the most experts a layer may use at `step`; `target` from `deadline` on."""
    start, target = jnp.asarray(self.start, jnp.int32), jnp.asarray(self.target, jnp.int32)
    left = jnp.clip(self.deadline - jnp.asarray(step, jnp.int32), 0, self.deadline)
    # ceil((start - target) * left / deadline) in integers
    return target + ((start - target) * left + self.deadline - 1) // self.deadline

  @property
  def calm_needed(self) -> int:
    """Ready steps out of the last `patience` that lower a layer's k."""
    return max(1, math.ceil(self.calm_fraction * self.patience - 1e-9))

  def init_state(self, num_experts: int, step=0) -> dict:
    """The state of a schedule that begins at `step`: k [layers] int32 (in force at that step:
    the start, under the ceiling), calm [layers] int32 (ready steps in the window), since
    [layers] int32 (steps since the layer's last change, at most `patience`), ready [layers,
    patience] int32 (1 where the layer was ready, oldest first; zero before its last change),
    load [layers, E] float32 (the moving average of the first-choice load, uniform at first)."""
    layers = len(self.start)
    return {"k": jnp.minimum(jnp.asarray(self.start, jnp.int32), self.ceiling(step)),
            "calm": jnp.zeros((layers,), jnp.int32),
            "since": jnp.zeros((layers,), jnp.int32),
            "ready": jnp.zeros((layers, self.patience), jnp.int32),
            "load": jnp.full((layers, num_experts), 1.0 / num_experts, jnp.float32)}

  def deviation(self, load: jax.Array) -> jax.Array:
    """float32 [layers]: max_i a_{l,i} * E - 1 of the smoothed first-choice load."""
    return jnp.max(load, axis=-1) * load.shape[-1] - 1.0

  def update(self, state: dict, first_choice: jax.Array, step) -> dict:
    """The state after a step whose global-batch first-choice counts were `first_choice`
    [layers, E]; `step` is the number of the next step (the one the new k is for)."""
    counts = jnp.asarray(first_choice, jnp.float32)
    f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    decay = 1.0 - 1.0 / self.smoothing
    load = decay * state["load"] + (1.0 - decay) * f
    deviation = self.deviation(load)
    typical = jnp.median(deviation)
    ready_now = (deviation <= typical + self.threshold).astype(jnp.int32)
    ready = jnp.concatenate([state["ready"][:, 1:], ready_now[:, None]], axis=1)
    since = jnp.minimum(state["since"] + 1, self.patience)
    calm = jnp.sum(ready, axis=1)
    k = state["k"]
    lower = ((since >= self.patience) & (calm >= self.calm_needed)
             & (k > jnp.asarray(self.target, jnp.int32)))
    higher = (deviation > typical + self.raise_above) & (k < jnp.asarray(self.start, jnp.int32))
    new_k = jnp.minimum(k - lower + higher, self.ceiling(step))
    changed = new_k != k
    ready = jnp.where(changed[:, None], 0, ready)
    return {"k": new_k.astype(jnp.int32),
            "calm": jnp.where(changed, 0, calm).astype(jnp.int32),
            "since": jnp.where(changed, 0, since).astype(jnp.int32),
            "ready": ready.astype(jnp.int32), "load": load}
