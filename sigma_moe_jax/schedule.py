"""Progressive sparsification: a per-layer top-k that changes with the step, traced under jit.

A schedule is a list of phases, each a start (a step, or a fraction of the run) and a per-layer
top-k. The per-layer top-k may be written as the authors' compact form, e.g.
"[8,8,6,6,4,4,2,2]+[1]*48", which is parsed here without `eval`.
"""

from __future__ import annotations

import dataclasses
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
