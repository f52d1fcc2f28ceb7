"""Typed run settings: the `train`, `data` and `mesh` sections of a config as frozen
dataclasses, validated once, and the translation of library errors into config keys.

Config files and the command line stay ml_collections (`run_config.make_config` lists every
key with its default); `from_config` turns a config into these types, so the trainer reads
`settings.train.steps`, never an untyped dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import ml_collections

from sigma_moe_jax.config import ModelConfig
from sigma_moe_jax.infra import aot
from sigma_moe_jax.infra.storage import project_path
from sigma_moe_jax.schedule import AdaptiveTopK, TopKSchedule, parse_per_layer, parse_phases
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.step import LR_SCHEDULES, BalanceSettings, Schedule


INIT_MODES = ("continue", "params")


def _stream(default):
  """A key the data stream depends on (the order of the batches, their geometry, the optimizer
  state's structure): a resumed run keeps it, as the saved iterator position refers to it; a
  run started from another's checkpoint may change it (`run_config.differences`)."""
  return dataclasses.field(default=default, metadata={"changes": "new_run"})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The optimisation run: length, batch geometry, optimizer, cadence of logs and saves."""

  steps: int = 1000  # optimizer steps of the whole run (fractional schedule starts refer to it)
  batch_size: int = _stream(8)  # sequences per step, over all processes and devices
  seq_len: int = _stream(256)  # tokens per sequence (packed documents)
  grad_accum: int = _stream(1)  # micro-batches per step (contiguous row blocks of the batch)
  lr: float = 3e-3  # peak learning rate
  lr_schedule: str = "wsd"  # `wsd` (warmup, stable, linear decay) or `cosine`
  warmup_steps: int = 50  # linear warmup from 0 to lr
  min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
  decay_fraction: float = 0.2  # wsd: share of steps spent decaying
  weight_decay: float = 0.1  # AdamW decoupled weight decay (not on norm scales)
  b1: float = 0.9  # AdamW first-moment decay
  b2: float = 0.95  # AdamW second-moment decay
  grad_clip: float = 1.0  # global gradient-norm clip
  router_lr_scale: float = _stream(1.0)  # the routers' learning rate as a multiple of lr
  log_every: int = 10  # steps between console / metrics.jsonl lines
  eval_every: int = 200  # steps between evaluations
  eval_batches: int = 16  # at most this many batches per evaluation set
  checkpoint_every: int = 200  # steps between checkpoints
  keep_checkpoints: int = 3  # newest checkpoints kept
  async_checkpointing: bool = True  # save in the background while training goes on
  seed: int = 0  # parameter initialisation
  peak_flops: float = 0.0  # per-device peak for MFU; 0: the known chip table, else measured
  init_from: str = ""  # another run's workdir to start from when this one has no checkpoint
  init_step: int = -1  # its checkpoint to start from; -1: the latest
  # What init_from takes: `continue` (the whole train state and the data position; the step
  # carries on, e.g. a branch under another schedule) or `params` (the parameters and the
  # loss-free bias only: a new run from step 0 with a fresh optimizer and data stream, as for
  # fine-tuning or continuing at a longer context).
  init_mode: str = "continue"
  # Steps whose loss or gradient norm is not finite are never applied (the update is skipped);
  # the run stops at the first one past this many in a row, exits non-zero, and saves nothing.
  max_bad_steps: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "keep_checkpoints"):
      _check(self, "train", name, getattr(self, name) >= 1, "must be >= 1")
    _check(self, "train", "seq_len", self.seq_len >= 2, "must be >= 2: a sequence needs a "
           "next token")
    _check(self, "train", "lr_schedule", self.lr_schedule in LR_SCHEDULES,
           f"must be one of {LR_SCHEDULES}")
    _check(self, "train", "warmup_steps", 0 <= self.warmup_steps < self.steps,
           f"must lie in [0, train.steps={self.steps})")
    _check(self, "train", "lr", self.lr > 0, "must be positive")
    for name in ("b1", "b2"):
      _check(self, "train", name, 0 <= getattr(self, name) < 1, "must lie in [0, 1)")
    _check(self, "train", "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must lie in [0, 1]")
    _check(self, "train", "decay_fraction", 0 < self.decay_fraction <= 1, "must lie in (0, 1]")
    _check(self, "train", "weight_decay", self.weight_decay >= 0, "must be >= 0")
    _check(self, "train", "grad_clip", self.grad_clip > 0, "must be positive")
    _check(self, "train", "router_lr_scale", self.router_lr_scale > 0, "must be positive")
    _check(self, "train", "peak_flops", self.peak_flops >= 0, "must be >= 0 (0: known or measured)")
    _check(self, "train", "max_bad_steps", self.max_bad_steps >= 0, "must be >= 0")
    _check(self, "train", "init_step", self.init_step >= -1, "must be a step >= 0, or -1 (latest)")
    _check(self, "train", "init_mode", self.init_mode in INIT_MODES, f"must be one of {INIT_MODES}")


DATA_FORMATS = ("text", "chat")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the text comes from and how it is split."""

  path: str = _stream("data/shakespeare.jsonl.gz")  # file, glob or comma list of .txt / .jsonl(.gz)
  tokenizer: str = _stream("data/shakespeare_bpe4096.json")  # tokenizer.json or .tiktoken ranks
  val_fraction: float = _stream(0.05)  # documents held out for validation
  seed: int = _stream(0)  # document split and shuffling
  # Shuffling of the training documents alone; -1: `seed` (the split stays).
  order_seed: int = _stream(-1)
  chunk_chars: int = _stream(0)  # > 0: cut training documents into pieces of at most this long
  eval_sets: str = ""  # "name=paths;name=paths": extra validation sets, logged <name>_val_*
  # Corpora too large for every host: list the files only, each process reads its own share one
  # file at a time (local or gs://); validation holds out whole files by val_fraction.
  shard_files: bool = _stream(False)
  # Each comma-separated path of `path` fills its own equal block of every batch's rows, so a
  # batch shard reads one path when the shards are a multiple of the paths (docs/design.md).
  rows_by_path: bool = _stream(False)
  # Supervised fine-tuning: `chat` reads JSONL conversations ({"messages": [...]} or {"prompt",
  # "completion"}), renders them with `chat_template` and trains on the assistant tokens only
  # (sigma_moe_jax/data/chat.py); whole conversations are packed several to a row. A conversation
  # longer than train.seq_len is refused, or cut to it with `truncate`.
  format: str = _stream("text")  # `text` (pre-training documents) or `chat`
  chat_template: str = _stream("data/chat_template.jinja")  # Jinja, Hugging Face convention
  truncate: bool = _stream(False)

  def __post_init__(self):
    _check(self, "data", "val_fraction", 0 <= self.val_fraction < 1, "must lie in [0, 1)")
    _check(self, "data", "chunk_chars", self.chunk_chars >= 0, "must be >= 0 (0: whole documents)")
    for name in ("path", "tokenizer"):
      _check(self, "data", name, bool(getattr(self, name).strip()), "must name a file")
    _check(self, "data", "rows_by_path", not (self.rows_by_path and self.shard_files),
           "excludes data.shard_files")
    _check(self, "data", "format", self.format in DATA_FORMATS, f"must be one of {DATA_FORMATS}")
    if self.format == "chat":
      for name, value in (("shard_files", self.shard_files), ("rows_by_path", self.rows_by_path),
                          ("chunk_chars", self.chunk_chars)):
        _check(self, "data", name, not value, "must be off (0 / False) with data.format 'chat': "
               "conversations are read whole")
    _check(self, "data", "truncate", not self.truncate or self.format == "chat",
           "only applies to data.format 'chat'")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """Mesh axis sizes; one may be -1 for the remaining devices (checked by `make_mesh`)."""

  data: int = -1  # pure data parallelism
  fsdp: int = 1  # splits the batch and d_model of every weight
  expert: int = 1  # splits the batch and the experts
  tensor: int = 1  # splits d_ff, heads and the vocabulary


SCHEDULE_KINDS = ("fixed", "adaptive")


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
  """The per-layer top-k over the run.

  kind `fixed`: per-layer top-k phases in `top_k`, "start:per_layer; start:per_layer" (start: a
  step, or a fraction of train.steps when it has a '.'); empty: model.top_k in every layer.
  kind `adaptive` (sigma_moe_jax.schedule.AdaptiveTopK): `top_k` is the per-layer start (one
  phase, e.g. "[2]*6"), `target` the per-layer end (empty: model.top_k everywhere). dev_l: the
  most loaded expert (max_i a_i * E - 1) of the load layer l would have at top-1, averaged over
  ~`smoothing` steps. A layer lowers its k by one once dev_l was at most the median layer's +
  `threshold` in at least `calm_fraction` of the last `patience` steps (1.0: all of them, in a
  row), goes back up by one above the median + `raise_above`, and every layer is at its target
  by `deadline` (a fraction of train.steps). The adaptive keys mean nothing to a fixed schedule.
  """

  kind: str = "fixed"
  top_k: str = ""
  target: str = ""
  deadline: float = 0.7
  threshold: float = 0.0
  patience: int = 50
  smoothing: int = 10
  raise_above: float = 1.0
  calm_fraction: float = 1.0

  def __post_init__(self):
    _check(self, "schedule", "kind", self.kind in SCHEDULE_KINDS,
           f"must be one of {SCHEDULE_KINDS}")


def model_and_schedule(config) -> Tuple[ModelConfig, Optional[Schedule]]:
  """The model a config describes and its top-k schedule (None: model.top_k everywhere). The
  model's static per-layer maximum top-k is the schedule's maximum over its phases (adaptive:
  its start)."""
  s, layers = ScheduleSettings(**config.schedule), config.model.num_layers
  schedule = None
  if s.kind == "adaptive":
    schedule = adaptive_schedule(s, layers, config.model.top_k, config.train.steps)
  elif s.top_k.strip():
    schedule = TopKSchedule.parse(parse_phases(s.top_k), layers, config.train.steps,
                                  config.model.num_experts)
  model = ModelConfig(**config.model, max_top_k=schedule.max_top_k if schedule else None)
  return model, schedule


def adaptive_schedule(s: ScheduleSettings, layers: int, top_k: int, steps: int) -> AdaptiveTopK:
  """The `schedule` section of kind adaptive as an AdaptiveTopK; errors name the config key."""
  def per_layer(key: str, text: str):
    try:
      values = parse_per_layer(text)
    except ValueError as e:
      raise ValueError(f"schedule.{key}: {e}") from None
    if len(values) != layers:
      raise ValueError(f"schedule.{key}: {len(values)} per-layer entries, expected "
                       f"model.num_layers={layers}")
    return tuple(values)
  if not s.top_k.strip() or ":" in s.top_k:
    raise ValueError(f"schedule.top_k: an adaptive schedule needs each layer's starting top-k "
                     f"as one per-layer list (e.g. [2]*{layers}), got {s.top_k!r}")
  start = per_layer("top_k", s.top_k)
  target = per_layer("target", s.target) if s.target.strip() else (top_k,) * layers
  if not 0 < s.deadline <= 1:
    raise ValueError(f"schedule.deadline must be a fraction of train.steps in (0, 1], got "
                     f"{s.deadline!r}")
  try:
    return AdaptiveTopK(start, target, deadline=max(1, int(round(s.deadline * steps))),
                        threshold=s.threshold, patience=s.patience, smoothing=s.smoothing,
                        raise_above=s.raise_above, calm_fraction=s.calm_fraction)
  except ValueError as e:
    raise ValueError(f"schedule: {e}") from None


# A run's config, section by section (`run_config` builds the dict layer on these).
SECTIONS = {"model": ModelConfig, "train": TrainSettings, "data": DataSettings,
            "balance": BalanceSettings, "schedule": ScheduleSettings, "mesh": MeshSettings}
# Keys saved under another name by older versions: (section, old) -> new.
RENAMED = {("schedule", "topk"): "top_k"}
# Derived, never set in a config: the model's per-layer maximum top-k comes from the schedule.
DERIVED = {("model", "max_top_k")}


def section_fields(section: str) -> List[dataclasses.Field]:
  """The fields of a section that a config sets."""
  return [f for f in dataclasses.fields(SECTIONS[section]) if (section, f.name) not in DERIVED]


def defaults() -> Dict[str, dict]:
  """{section: {key: default}} for every key a config has."""
  return {section: {f.name: f.default for f in section_fields(section)} for section in SECTIONS}


def with_defaults(config: dict) -> dict:
  """A config dict with the keys it lacks (written before they existed) at their defaults and
  renamed keys under their new names; other top-level entries (the fingerprint) are kept."""
  filled = dict(config)
  for section, values in defaults().items():
    saved = dict(config.get(section, {}))
    for (renamed_section, old), new in RENAMED.items():
      if renamed_section == section and old in saved:
        saved[new] = saved.pop(old)
    filled[section] = {**values, **saved}
  return filled


class Settings(NamedTuple):
  model: ModelConfig
  schedule: Optional[Schedule]
  train: TrainSettings
  data: DataSettings
  balance: BalanceSettings
  mesh: MeshSettings


def from_config(config: Any) -> Settings:
  """Typed settings from a config (ml_collections or a plain dict of sections); a bad value is
  one error naming its key. Keys an older config lacks take their defaults
  (`with_defaults`)."""
  config = ml_collections.ConfigDict(with_defaults(
      config.to_dict() if hasattr(config, "to_dict") else dict(config)))
  model, schedule = model_and_schedule(config)
  return Settings(model, schedule, TrainSettings(**config.train),
                  data_settings(config.data), BalanceSettings(**config.balance),
                  MeshSettings(**config.mesh))


def lr_and_optimizer(t: TrainSettings):
  """(learning-rate schedule, optax optimizer) of the train settings."""
  lr = train_lib.learning_rate_schedule(lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps,
                                        kind=t.lr_schedule, min_lr_ratio=t.min_lr_ratio,
                                        decay_fraction=t.decay_fraction)
  optimizer = train_lib.make_optimizer(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                                       grad_clip=t.grad_clip, router_lr_scale=t.router_lr_scale)
  return lr, optimizer


def step_plan(settings: Settings) -> aot.StepPlan:
  """What the train step of these settings is built from, for ahead-of-time compilation."""
  t = settings.train
  lr, optimizer = lr_and_optimizer(t)
  return aot.StepPlan(settings.model, settings.schedule, settings.balance, optimizer, lr,
                      t.batch_size, t.seq_len, t.grad_accum,
                      loss_mask=settings.data.format == "chat")


def data_settings(data) -> DataSettings:
  """The data section with the shipped corpus and tokenizer found from any directory."""
  return DataSettings(**{**data, "path": project_path(data.path),
                         "tokenizer": project_path(data.tokenizer),
                         "chat_template": project_path(data.get("chat_template",
                                                                DataSettings.chat_template))})


def _check(settings, section: str, name: str, ok: bool, rule: str) -> None:
  if not ok:
    raise ValueError(f"{section}.{name} {rule}, got {getattr(settings, name)!r}")
