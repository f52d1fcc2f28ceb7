"""The runs ("variants") the studies compare: each is the base config of
configs/reproduce.py with a few changes. Building a config writes nothing; the data
files a variant reads are written by `registry.prepare_data`.
"""

from __future__ import annotations

from typing import Callable, Dict

import ml_collections

from experiments.studies.domain_data import domain_paths, no_newline_path
from sigma_moe_jax.infra import storage
from sigma_moe_jax.schedule import parse_per_layer

SWITCH_FRACTION = 0.9
DOMAIN_MESH_DATA = 4  # batch shards of the domain study: micro-batch LBL differs from global
DOMAIN_MODES = ("global", "micro_batch", "sequence")
DOMAIN_VARIANTS = tuple(f"domains_{m}" for m in DOMAIN_MODES)
# Each batch shard reads one domain: where micro-batch LBL should differ most from global.
DOMAIN_SHARD_MODES = ("global", "micro_batch")
DOMAIN_SHARD_VARIANTS = tuple(f"domains_by_shard_{m}" for m in DOMAIN_SHARD_MODES)


# Progressive sparsification: more experts in the two lowest layers (a quarter of 8), as the
# paper's [8,8,6,6,4,4,2,2]+[1]*48 does in its lowest seventh; then top-1 everywhere.
def phase1_top_k(num_layers: int) -> str:
  if num_layers < 3:
    raise ValueError("the progressive study needs model.num_layers >= 3")
  return f"[4,2]+[1]*{num_layers - 2}"


def branch_step(config, fraction: float = SWITCH_FRACTION) -> int:
  """The step at `fraction` of the run, where a run starting from phase 1's checkpoint
  branches off (the progressive study's switch to top-1)."""
  step = int(round(fraction * config.train.steps))
  if step % config.train.checkpoint_every or step <= 0:
    raise ValueError(f"a study branches at step {step} ({fraction:.0%} of train.steps="
                     f"{config.train.steps}), which must be a multiple of "
                     f"train.checkpoint_every={config.train.checkpoint_every}")
  if config.train.keep_checkpoints * config.train.checkpoint_every < config.train.steps - step:
    raise ValueError("train.keep_checkpoints is too small to keep the branch checkpoint")
  return step


# The transition study: the switch to top-1 at 50%, 70% and 90% of the run, abrupt (every layer
# at once) or gradual (every layer above top-1 lowers its k by one at each of GRADUAL_STAGES
# steps spread over the last GRADUAL_WINDOW of the run before the switch point).
TRANSITION_FRACTIONS = (0.5, 0.7, 0.9)
GRADUAL_WINDOW = 0.1
GRADUAL_STAGES = 3


def gradual_schedule(config, switch: float) -> str:
  """Phase 1's top-k, then k lowered by one per stage, all top-1 at step switch * steps."""
  phase1 = parse_per_layer(phase1_top_k(config.model.num_layers))
  steps, start = config.train.steps, switch - GRADUAL_WINDOW
  phases = [f"0:{phase1_top_k(config.model.num_layers)}"]
  for stage in range(1, GRADUAL_STAGES + 1):
    at = int(round((start + GRADUAL_WINDOW * stage / GRADUAL_STAGES) * steps))
    ks = [max(1, k - stage) for k in phase1] if stage < GRADUAL_STAGES else [1] * len(phase1)
    phases.append(f"{at}:[{','.join(map(str, ks))}]")
  return "; ".join(phases)


# The transition study's variants: name -> (gradual, switch fraction).
TRANSITIONS = {("progressive" if (not g and f == SWITCH_FRACTION) else
                f"{'gradual' if g else 'switch'}{int(f * 100)}"): (g, f)
               for g in (False, True) for f in TRANSITION_FRACTIONS}
FROM_PHASE1 = tuple(TRANSITIONS)


def _from_phase1(switch: float, gradual: bool):
  """Phase 1's run continued from its checkpoint, converted to top-1 at fraction `switch`."""
  def change(c, workdir, seed_suffix=""):
    if gradual:
      c.schedule.top_k = gradual_schedule(c, switch)
      c.train.init_step = branch_step(c, switch - GRADUAL_WINDOW)
    else:
      c.schedule.top_k = (f"0:{phase1_top_k(c.model.num_layers)}; "
                         f"{switch}:[1]*{c.model.num_layers}")
      c.train.init_step = branch_step(c, switch)
    c.train.init_from = storage.join(workdir, "runs", "phase1" + seed_suffix)
  return change


def _lbl(c, workdir):
  del c, workdir  # the base config as it is


def _phase1(c, workdir):
  del workdir
  c.schedule.top_k = phase1_top_k(c.model.num_layers)


_progressive = _from_phase1(SWITCH_FRACTION, gradual=False)


def _adaptive(c, workdir):
  """Issue 16: phase 1's start, each layer lowering its own k when balanced, every layer at
  top-1 by the manual schedule's switch: never more experts than the manual schedule."""
  del workdir
  c.schedule.kind = "adaptive"
  c.schedule.top_k = phase1_top_k(c.model.num_layers)
  c.schedule.deadline = SWITCH_FRACTION


# Issue 24's version of the rule: calm steps counted over a window of ADAPTIVE_WINDOW steps, a
# layer lowered once it was at or below the median layer in at least ADAPTIVE_CALM_FRACTION of
# them. Chosen from the signal the in-a-row runs logged (`adaptive` study,
# "window_shares_at_or_above_calm_fraction"): in 50-step windows layer 0 was ready at least half
# the time in a third to two thirds of the windows, layer 1 in about a tenth, so the rule can act.
ADAPTIVE_WINDOW = 50
ADAPTIVE_CALM_FRACTION = 0.5


def _adaptive_window(c, workdir):
  _adaptive(c, workdir)
  c.schedule.patience = ADAPTIVE_WINDOW
  c.schedule.calm_fraction = ADAPTIVE_CALM_FRACTION


def _ramp(c, workdir):
  """The adaptive schedule with its rule switched off: the linear ceiling alone (a layer is
  never calm for a whole run, and never raised)."""
  _adaptive(c, workdir)
  c.schedule.patience = c.train.steps + 1
  c.schedule.raise_above = 1e9


def _no_lbl(c, workdir):
  """The control: top-1 with no balancing at all."""
  del workdir
  c.balance.loss = "none"


def _deep(c, workdir):
  """Twice the layers (Fig. 2a/2c's lower-against-upper contrast over more depth)."""
  del workdir
  c.model.num_layers = 16


def _loss_free(c, workdir):
  del workdir
  c.model.gate_fn = "sigmoid"
  c.balance.loss = "none"
  c.balance.loss_free = True


def _top1_lbl(tau: float = 0.1, coef: float = None):
  """The Top-1 LBL at temperature `tau` (docs/design.md "Top-1 LBL (Eq. 2)"), at the base
  config's coefficient unless `coef` is given."""
  def change(c, workdir):
    del workdir
    c.balance.loss = "top1_lbl"
    c.model.top1_lbl_tau = tau
    if coef is not None:
      c.balance.coef = coef
  return change


def _no_newline(c, workdir):
  """The token-frequency control: the corpus with its line breaks replaced by spaces, so no
  token is a tenth of the data (the floor a router sending the end-of-line token by identity
  would set on the max load)."""
  c.data.path = no_newline_path(workdir)


def _dense(c, workdir):
  del workdir
  c.model.num_experts = 1  # one expert of the same size: the same activated parameters
  c.model.capacity_factor = 1.0
  c.balance.loss = "none"


def _domain_mix(mode, rows_by_domain=False):
  """English and Python: each batch a random mix of both, or (rows_by_domain) half English,
  half Python, so that each of the DOMAIN_MESH_DATA batch shards reads a single domain."""
  def change(c, workdir):
    paths = domain_paths(workdir)
    c.data.path = ",".join(paths[d]["train"] for d in ("english", "python"))
    c.data.val_fraction = 0.0
    c.data.eval_sets = ";".join(f"{d}={paths[d]['val']}" for d in ("english", "python"))
    c.model.lbl_mode = mode
    c.mesh.data = DOMAIN_MESH_DATA
    if rows_by_domain:
      c.data.rows_by_path = True
  return change


VARIANTS: Dict[str, Callable] = {
    "lbl": _lbl,
    "phase1": _phase1,
    "progressive": _progressive,  # after phase1: it starts from phase1's checkpoint
    "adaptive": _adaptive,
    "adaptive_window": _adaptive_window,
    "ramp": _ramp,
    # The transition study, also from phase1's checkpoints ("progressive" is the abrupt switch
    # at 90%).
    **{name: _from_phase1(f, g) for name, (g, f) in TRANSITIONS.items() if name != "progressive"},
    "no_lbl": _no_lbl,
    "deep": _deep,
    "loss_free": _loss_free,
    "top1_lbl": _top1_lbl(),
    "top1_lbl_tau0.3": _top1_lbl(tau=0.3),
    "top1_lbl_coef1e-2": _top1_lbl(coef=1e-2),
    "dense": _dense,
    "no_newline": _no_newline,
    "domains_global": _domain_mix("global"),
    "domains_micro_batch": _domain_mix("micro_batch"),
    "domains_sequence": _domain_mix("sequence"),
    **{f"domains_by_shard_{m}": _domain_mix(m, rows_by_domain=True) for m in DOMAIN_SHARD_MODES},
}


# "<variant>_seed<n>": the variant with another initialisation and another order of the training
# documents (train.seed = data.order_seed = n); the validation split stays.
SEEDED = ("lbl", "phase1", "adaptive", "adaptive_window", "ramp", "loss_free", "deep",
          "top1_lbl") + FROM_PHASE1
# Seeds 3-5 exist for the drop-free set's extended studies (issue 32); the other sets use 0-2.
SEEDS = (1, 2, 3, 4, 5)
for _name in SEEDED:
  for _seed in SEEDS:
    VARIANTS[f"{_name}_seed{_seed}"] = VARIANTS[_name]


def split_seed(name: str):
  """"lbl_seed2" -> ("lbl", 2); "lbl" -> ("lbl", 0)."""
  base, _, seed = name.rpartition("_seed")
  return (base, int(seed)) if base and seed.isdigit() else (name, 0)


def variant_config(base, name: str, workdir: str) -> ml_collections.ConfigDict:
  """The config of variant `name`: a copy of `base` with its changes (paths under workdir)."""
  config = ml_collections.ConfigDict(base.to_dict())
  kind, seed = split_seed(name)
  if kind in FROM_PHASE1:
    VARIANTS[kind](config, workdir, f"_seed{seed}" if seed else "")
  else:
    VARIANTS[name](config, workdir)
  if seed:
    config.train.seed = seed
    config.data.order_seed = seed
  return config
