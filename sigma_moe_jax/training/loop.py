"""The training loop: `fit` applies a step function to batches up to a step, and hooks do the
rest (the log line, metrics, evaluation, checkpoints, preemption, divergence).

    state = fit(state, step_fn, batches, until=1000, hooks=[MyHook()])

`step_fn(state, batch) -> (state, metrics)` is any function of that shape, usually the jitted
step of `sigma_moe_jax.training.step`. A hook is any object with some of the methods of `Hook`;
the loop calls them in the order given, so a hook that writes what others recorded comes after
them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, List, Optional, Sequence


@dataclasses.dataclass
class StepEnd:
  """What the hooks see after a step. `record` collects values to write for this step and `line`
  the parts of its console line; both start empty at every step."""

  step: int  # steps taken, counting this one
  until: int  # the step the loop stops at
  state: Any
  metrics: Any  # as the step function returned them (device arrays)
  record: dict = dataclasses.field(default_factory=dict)
  line: List[str] = dataclasses.field(default_factory=list)

  def log(self, values: dict, text: str = "") -> None:
    """Adds values to this step's record and, when given, a part to its console line."""
    self.record.update(values)
    if text:
      self.line.append(text)

  def every(self, interval: int) -> bool:
    """Whether this step is a multiple of `interval`, or the last step of the loop."""
    return self.step % interval == 0 or self.step == self.until


class Hook:
  """The methods `fit` calls; a hook overrides those it needs (an object without one is fine)."""

  def after_step(self, end: StepEnd) -> None:
    """After every step. Raising stops the loop; `close` still runs."""

  def at_end(self, end: StepEnd) -> None:
    """Once, when the loop reached `until` or the batches ran out (not after an error)."""

  def close(self, error: Optional[BaseException]) -> None:
    """Always, last, in reverse order: `error` is what stopped the loop, or None."""


def fit(state, step_fn: Callable, batches: Iterable, *, until: int,
        hooks: Sequence[Any] = ()):
  """Runs `step_fn` from `state.step` up to step `until` (or until `batches` runs out) and
  returns the final state. Hooks are called after each step and at the end; they may raise to
  stop the run (for instance `RunStopped` after saving)."""
  step = int(state.step)
  batches = iter(batches)
  end = StepEnd(step, until, state, None)
  error = None
  try:
    while step < until:
      try:
        batch = next(batches)
      except StopIteration:
        break
      state, metrics = step_fn(state, batch)
      step += 1
      end = StepEnd(step, until, state, metrics)
      for hook in hooks:
        _call(hook, "after_step", end)
    for hook in hooks:
      _call(hook, "at_end", end)
  except BaseException as e:
    error = e
    raise
  finally:
    failure = None
    for hook in reversed(hooks):  # every hook closes, whatever an earlier one raised
      try:
        _call(hook, "close", error)
      except BaseException as e:  # noqa: BLE001
        failure = failure or e
    if failure is not None and error is None:  # a stop already under way keeps its reason
      raise failure
  return state


def _call(hook, name: str, argument) -> None:
  method = getattr(hook, name, None)
  if method is not None:
    method(argument)
