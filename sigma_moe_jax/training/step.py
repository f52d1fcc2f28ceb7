"""The training step: a pure function of explicit state, jitted once.

  state, metrics = train_step(state, batch)

`state` is a `TrainState` (parameters as a pure dict, optax state, the loss-free balancing bias,
the per-layer top-k and the adaptive schedule's state, the step); `batch` holds int32
[batch, seq] `tokens`, `segment_ids` and `positions`, and for supervised fine-tuning a
`loss_mask` (1 on the tokens that are targets). Nothing is mutated inside jit: the model is
rebuilt from its graph definition and the parameters each call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int
from jax.sharding import NamedSharding, PartitionSpec as P

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.infra import sharding
from sigma_moe_jax.model import Layers, Transformer, under_blocks, unstack_layers
from sigma_moe_jax.moe.balancing import (BALANCE_LOSSES, MoEStats, combine_micro_batches,
                                         routing_metrics, update_selection_bias)
from sigma_moe_jax.schedule import AdaptiveTopK, TopKSchedule

Schedule = Union[TopKSchedule, AdaptiveTopK]

LR_SCHEDULES = ("wsd", "cosine")


@dataclasses.dataclass(frozen=True)
class BalanceSettings:
  """How the objective balances the experts.

  loss: `lbl` (Eq. 1, in the model's lbl_mode), `top1_lbl` (Eq. 2) or `none`; coef multiplies
  the sum over layers. loss_free: choose experts by score + bias and update the bias after each
  step by `bias_rate` * sign(mean load - load) (Wang et al.). accumulate_counts: with gradient
  accumulation, micro-batch m forms f from the counts of micro-batches 1..m of the same step
  (a running global batch); otherwise each micro-batch uses its own counts.
  """

  loss: str = "lbl"
  coef: float = 1e-3
  z_loss_coef: float = 0.0
  loss_free: bool = False
  bias_rate: float = 1e-3
  accumulate_counts: bool = False

  def __post_init__(self):
    if self.loss not in BALANCE_LOSSES:
      raise ValueError(f"balance.loss: must be one of {tuple(BALANCE_LOSSES)}, got "
                       f"{self.loss!r}")
    for name in ("coef", "z_loss_coef", "bias_rate"):
      if getattr(self, name) < 0:
        raise ValueError(f"balance.{name}: must be >= 0, got {getattr(self, name)!r}")


class TrainState(NamedTuple):
  params: Any  # pure dict of float32 arrays
  opt_state: Any
  selection_bias: jax.Array  # float32 [layers, experts]; zeros unless loss-free balancing
  # {"k": int32 [layers] in force at `step`, "calm": int32 [layers], "load": float32
  # [layers, experts]}; the adaptive schedule's state (AdaptiveTopK.init_state) also holds its
  # window ("since", "ready"); with a fixed schedule only k moves, following the schedule.
  top_k_state: Any
  step: jax.Array  # int32 scalar


def learning_rate_schedule(*, lr: float, steps: int, warmup_steps: int, kind: str,
                           min_lr_ratio: float = 0.1, decay_fraction: float = 0.2):
  """optax schedule: `cosine` (warmup + cosine to lr * min_lr_ratio) or `wsd`
  (warmup, stable, then linear decay over the last `decay_fraction` of steps)."""
  if warmup_steps >= steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be below steps ({steps})")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, steps, lr * min_lr_ratio)
  if kind == "wsd":
    decay_steps = max(1, int(round(steps * decay_fraction)))
    stable_steps = max(0, steps - warmup_steps - decay_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr),
         optax.linear_schedule(lr, lr * min_lr_ratio, decay_steps)],
        [warmup_steps, warmup_steps + stable_steps])
  raise ValueError(f"learning-rate schedule must be one of {LR_SCHEDULES}, got {kind!r}")


def weight_decay_mask(params):
  """True for the parameters AdamW decays: all but the norms' scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(schedule: Callable, *, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0,
                   router_lr_scale: float = 1.0):
  """Global-norm clipping then AdamW; norms' scales get no weight decay. `router_lr_scale`
  multiplies the routers' updates (their learning rate), when it is not 1."""
  def router_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "router" in jax.tree_util.keystr(path), params)
  # optax.adamw's chain, with its Adam step skippable in place (`scale_by_adam_unless_skipped`);
  # the state has optax.adamw's structure.
  adamw = optax.chain(scale_by_adam_unless_skipped(b1, b2),
                      optax.add_decayed_weights(weight_decay, weight_decay_mask),
                      optax.scale_by_learning_rate(schedule))
  steps = [optax.clip_by_global_norm(grad_clip), adamw]
  if router_lr_scale != 1.0:
    steps.append(optax.masked(optax.scale(router_lr_scale), router_mask))
  return SkipsInPlace(*optax.chain(*steps))


class SkipsInPlace(optax.GradientTransformationExtraArgs):
  """An optimizer whose update takes `finite` and keeps its own state when it is False (what
  `make_optimizer` builds). The train step keeps any other optimizer's state by a select
  after its update."""


def scale_by_adam_unless_skipped(b1: float, b2: float, eps: float = 1e-8):
  """`optax.scale_by_adam` (same state, same arithmetic) whose moments and count stay as they were
  when the update's extra argument `finite` is False: a step the train step skips. The update is
  formed from the moments it keeps.

  Why not optax's own followed by a select between the new state and the old: the parameters'
  update then depends on moments that the select may discard, so XLA recomputes them inside the
  parameters' update from the old moments, which the new ones overwrite in place (the state is
  donated); to keep that order safe it copies every moment first, a full copy of the optimizer
  state at every step (216 against 121 ms for the d 512 state on the CPU,
  benchmarks/optimizer_update.py)."""
  def init(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update(updates, state, params=None, *, finite=True, **unused_extra_args):
    del params
    keep = lambda new, old: jnp.where(finite, new, old)
    count = keep(optax.safe_increment(state.count), state.count)
    mu = jax.tree.map(keep, optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
    nu = jax.tree.map(keep, optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2),
                      state.nu)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    step = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return step, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def init_model(cfg: ModelConfig, seed: int):
  """(graphdef, float32 parameters as a pure dict)."""
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def fixed_top_k(cfg: ModelConfig, schedule: Optional[TopKSchedule], step) -> jax.Array:
  """int32 [layers]: the top-k at `step` of a fixed schedule (None: model.top_k everywhere)."""
  if schedule is None:
    return jnp.full((cfg.num_layers,), cfg.top_k, jnp.int32)
  return schedule.top_k_at(step)


def init_top_k_state(cfg: ModelConfig, schedule: Optional[Schedule] = None, step=0) -> dict:
  """The schedule's state as it begins at `step` (TrainState.top_k_state)."""
  if isinstance(schedule, AdaptiveTopK):
    return schedule.init_state(cfg.num_experts, step)
  return {"k": fixed_top_k(cfg, schedule, step),
          "calm": jnp.zeros((cfg.num_layers,), jnp.int32),
          "load": jnp.full((cfg.num_layers, cfg.num_experts), 1.0 / cfg.num_experts, jnp.float32)}


def top_k_in_force(state: TrainState, cfg: ModelConfig,
                   schedule: Optional[Schedule] = None) -> jax.Array:
  """int32 [layers]: the top-k the step `state.step` runs with. A fixed schedule is keyed on the
  step alone (a run started from another run's checkpoint follows its own schedule)."""
  if isinstance(schedule, AdaptiveTopK):
    return state.top_k_state["k"]
  return fixed_top_k(cfg, schedule, state.step)


def init_state(params, optimizer, cfg: ModelConfig,
               schedule: Optional[Schedule] = None) -> TrainState:
  return TrainState(params, optimizer.init(params),
                    jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.float32),
                    init_top_k_state(cfg, schedule), jnp.zeros((), jnp.int32))


def abstract_sharded_state(cfg: ModelConfig, optimizer, mesh, seed: int = 0,
                           schedule: Optional[Schedule] = None):
  """(graphdef, abstract state, state shardings): shapes and placements, nothing allocated."""
  graphdef = model_graphdef(cfg)
  abstract = jax.eval_shape(lambda: init_state(init_model(cfg, seed)[1], optimizer, cfg,
                                               schedule))
  shardings = sharding.state_shardings(
      abstract, sharding.param_shardings(abstract.params, mesh), mesh)
  return graphdef, abstract, shardings


def init_sharded_state(cfg: ModelConfig, seed: int, optimizer, mesh,
                       schedule: Optional[Schedule] = None):
  """(graphdef, state, state shardings) with the state created directly in its shardings: the
  20B model never exists whole on one device."""
  graphdef, _, shardings = abstract_sharded_state(cfg, optimizer, mesh, seed, schedule)
  make = lambda: init_state(init_model(cfg, seed)[1], optimizer, cfg, schedule)
  return graphdef, jax.jit(make, out_shardings=shardings)(), shardings


def per_layer_state(cfg: ModelConfig, state: TrainState, shardings):
  """(state, shardings) in the layout the train step runs on: with the layers unrolled
  (`model.scan_layers=False`) the block parameters and their AdamW moments are held one array
  per layer (`model.Layers`), which spares the step a slice of every weight in the forward and
  a re-stacking of every gradient in the backward; with the layer scan, or where the mesh splits
  the layer axis, as they are. Checkpoints always store the stacked layout
  (`Checkpointer.save` stacks, `model.stack_layers`). `shardings` may be None (one device)."""
  if cfg.scan_layers:
    return state, shardings
  if shardings is None:
    return jax.jit(unstack_layers)(state), None
  if any(under_blocks(path) and len(s.spec) and s.spec[0] is not None
         for path, s in jax.tree_util.tree_leaves_with_path(shardings)):
    return state, shardings
  shardings = jax.tree_util.tree_map_with_path(
      lambda path, s: (Layers([NamedSharding(s.mesh, P(*s.spec[1:]))] * cfg.num_layers)
                       if under_blocks(path) else s), shardings)
  # Compiled, so that arrays spread over several processes split too.
  return jax.jit(unstack_layers, out_shardings=shardings)(state), shardings


def jit_train_step(graphdef, optimizer, lr_schedule: Callable, cfg: ModelConfig,
                   balance: "BalanceSettings", state_shardings, mesh, *,
                   schedule: Optional[Schedule] = None, grad_accum: int = 1):
  """`make_train_step` jitted for a mesh: state in its shardings (donated), the batch split over
  the batch axes, metrics replicated."""
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
  step = make_train_step(graphdef, optimizer, lr_schedule, cfg, balance, schedule=schedule,
                         grad_accum=grad_accum)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def target_mask(segment_ids, loss_mask=None):
  """bool [batch, seq - 1]: which next tokens are targets. Targets that start a new document or
  are padding never are; with a `loss_mask` [batch, seq] (supervised fine-tuning: 1 on the
  tokens the model must produce, e.g. assistant replies) only tokens it marks are."""
  mask = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
  if loss_mask is not None:
    mask = mask & (loss_mask[:, 1:] > 0)
  return mask


@jax.custom_vjp
def cross_entropy(logits: Float[Array, "... V"], labels: Int[Array, "..."]) -> Float[Array, "..."]:
  """-log softmax(logits)[label] in float32. The gradient, softmax minus the label's one-hot,
  is one elementwise pass over the logits from the saved log-sum-exp (autodiff would scatter
  into a zero array for the picked logit and keep the normalised exponentials)."""
  return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_fwd(logits, labels):
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, labels, lse)


def _cross_entropy_bwd(saved, d_loss):
  logits, labels, lse = saved
  one_hot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
  d_logits = d_loss[..., None] * (jnp.exp(logits - lse[..., None]) - one_hot)
  return d_logits, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def lm_loss_terms(logits, tokens, segment_ids, loss_mask=None):
  """Summed next-token cross-entropy over the targets of `target_mask`, and their number.

  The loss is taken at every position against the next token (the last position's target is
  a placeholder, masked out) rather than on `logits[:, :-1]`: slicing would copy the
  [batch, seq, vocab] logits, and their gradient would be padded back to full length."""
  with jax.named_scope("loss"):
    mask = jnp.pad(target_mask(segment_ids, loss_mask), ((0, 0), (0, 1)))
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    ce = cross_entropy(logits, next_tokens)
    return jnp.sum(jnp.where(mask, ce, 0.0)), jnp.sum(mask)


def make_train_step(graphdef, optimizer, lr_schedule: Callable, cfg: ModelConfig,
                    balance: BalanceSettings, *, schedule: Optional[Schedule] = None,
                    grad_accum: int = 1):
  """Builds train_step(state, batch) -> (state, metrics). Jit it with donate_argnums=0."""
  if balance.accumulate_counts and cfg.lbl_mode != "global":
    raise ValueError(f"balance.accumulate_counts needs model.lbl_mode 'global', not "
                     f"{cfg.lbl_mode!r}: the carried counts are global-batch counts")
  if schedule is not None and tuple(cfg.max_top_k_per_layer) != schedule.max_top_k:
    raise ValueError(f"model.max_top_k {cfg.max_top_k_per_layer} must equal the schedule's "
                     f"per-layer maximum {schedule.max_top_k}")

  def micro_loss(params, micro, top_k, bias, offset, total_targets):
    model = nnx.merge(graphdef, params)
    logits, stats = model(micro["tokens"], micro["segment_ids"], micro["positions"], top_k=top_k,
                          selection_bias=bias, count_offset=offset)
    ce_sum, targets = lm_loss_terms(logits, micro["tokens"], micro["segment_ids"],
                                    micro.get("loss_mask"))
    balance_loss = BALANCE_LOSSES[balance.loss](stats)
    z_loss = jnp.sum(stats.router_z_loss)
    objective = (ce_sum / total_targets
                 + (balance.coef * balance_loss + balance.z_loss_coef * z_loss) / grad_accum)
    return objective, (ce_sum, stats)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    top_k = top_k_in_force(state, cfg, schedule)
    bias = state.selection_bias if balance.loss_free else None
    total_targets = jnp.maximum(
        jnp.sum(target_mask(batch["segment_ids"], batch.get("loss_mask"))), 1)
    objective, ce_sum, stats, grads = _gradients(
        lambda micro, offset: grad_fn(state.params, micro, top_k, bias, offset, total_targets),
        state.params, batch, cfg, grad_accum, balance.accumulate_counts)
    loss, grad_norm = jnp.sum(objective), optax.tree.norm(grads)
    new_state, finite = _apply(state, grads, stats, jnp.isfinite(loss) & jnp.isfinite(grad_norm),
                               optimizer, cfg, balance, schedule)
    metrics = {
        "loss": loss,
        "finite": finite,
        "lm_loss": jnp.sum(ce_sum) / total_targets,
        "lr": lr_schedule(state.step),
        "grad_norm": grad_norm,
        "targets": total_targets,
        "top_k": top_k,
        "bias_abs_mean": jnp.mean(jnp.abs(new_state.selection_bias), axis=-1),
        # The spread across experts is what changes choices; a common shift changes none.
        "bias_std": jnp.std(new_state.selection_bias, axis=-1),
        **routing_metrics(stats),
    }
    metrics["lbl"] = jnp.mean(metrics["lbl_per_layer"])
    return new_state, metrics

  return train_step


def _gradients(grad_fn: Callable, params, batch, cfg: ModelConfig, grad_accum: int,
               accumulate_counts: bool):
  """(objective, summed cross-entropy, routing statistics, gradients) of a batch, summed over its
  `grad_accum` micro-batches (contiguous row blocks). `grad_fn(micro, count_offset)` is the
  micro-batch's value and gradient; with `accumulate_counts` micro-batch m is offset by the
  expert counts of micro-batches 1..m-1."""
  zero_counts = jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.float32)
  if grad_accum == 1:  # no loop, no zero-initialised gradient sum to add into
    (objective, (ce_sum, stats)), grads = grad_fn(batch,
                                                  zero_counts if accumulate_counts else None)
    return objective, ce_sum, stats, grads

  def accumulate(carry, micro):
    grads_sum, counts = carry
    (objective, (ce_sum, stats)), grads = grad_fn(micro, counts if accumulate_counts else None)
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    counts = counts + stats.counts.tokens_per_expert.astype(jnp.float32)
    return (grads_sum, counts), (objective, ce_sum, stats)

  micro_batches = jax.tree.map(
      lambda a: a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:]), batch)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  (grads, _), (objective, ce_sum, stats) = jax.lax.scan(
      accumulate, (zero_grads, zero_counts), micro_batches)
  return objective, ce_sum, combine_micro_batches(stats), grads


def _apply(state: TrainState, grads, stats: MoEStats, finite, optimizer, cfg: ModelConfig,
           balance: BalanceSettings, schedule: Optional[Schedule]):
  """(the next state, finite): AdamW on the parameters, the loss-free bias and the schedule's
  state moved on. A step with a non-finite loss or gradient is not applied: parameters, Adam's
  moments and count and the bias stay as they were (the step counter, the learning-rate
  schedule's count and the data move on), so no NaN is ever stored. `make_optimizer`'s keeps its
  moments itself (`scale_by_adam_unless_skipped`, told by `finite`); another optimizer's whole
  state is kept by a select here."""
  keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  if isinstance(optimizer, SkipsInPlace):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, finite=finite)
  else:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    opt_state = keep_if_bad(opt_state, state.opt_state)
  params = optax.apply_updates(state.params, updates)
  selection_bias = state.selection_bias
  if balance.loss_free:
    selection_bias = update_selection_bias(selection_bias, stats.counts.tokens_per_expert,
                                           balance.bias_rate)
  if isinstance(schedule, AdaptiveTopK):
    top_k_state = schedule.update(state.top_k_state, stats.counts.first_choice,
                                  state.step + 1)
  else:
    top_k_state = {**state.top_k_state, "k": fixed_top_k(cfg, schedule, state.step + 1)}
  new = TrainState(keep_if_bad(params, state.params), opt_state,
                   keep_if_bad(selection_bias, state.selection_bias),
                   keep_if_bad(top_k_state, state.top_k_state), state.step + 1)
  return new, finite


def model_graphdef(cfg: ModelConfig):
  """The graphdef of the model `cfg` describes, nothing allocated."""
  return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def make_eval_step(graphdef):
  """eval_step(params, batch, top_k, selection_bias=None) -> (summed cross-entropy, targets,
  `RoutingCounts` [layers, ...]): the counts add up over batches (a tree sum) into the load
  statistics of a whole evaluation set. Pass the graphdef of a dropless model
  (`generate.inference_config`) so that no evaluated token skips its experts."""

  def eval_step(params, batch, top_k, selection_bias=None):
    logits, stats = nnx.merge(graphdef, params)(batch["tokens"], batch["segment_ids"],
                                                batch["positions"], top_k=top_k,
                                                selection_bias=selection_bias)
    ce_sum, targets = lm_loss_terms(logits, batch["tokens"], batch["segment_ids"],
                                    batch.get("loss_mask"))
    return ce_sum, targets, stats.counts

  return eval_step
