"""A trained run, loaded for inference: its config, tokenizer and a checkpoint's parameters.

Shared by `sigma_moe_jax.cli.generate` and `sigma_moe_jax.cli.evaluate`. The model is rebuilt
dropless (`generate.inference_config`); the per-layer top-k defaults to the last phase of the
run's schedule.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sigma_moe_jax.data.pipeline import check_vocab
from sigma_moe_jax.data.tokenizer import Tokenizer, load_tokenizer
from sigma_moe_jax.inference import generate
from sigma_moe_jax.infra import sharding, storage
from sigma_moe_jax.schedule import parse_per_layer
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.checkpoint import Checkpointer, abstract_like
from sigma_moe_jax.training.resume import fingerprint
from sigma_moe_jax.training.settings import Settings, from_config


class LoadedRun(NamedTuple):
  settings: Settings
  graphdef: Any
  params: Any
  selection_bias: Optional[jax.Array]  # loss-free balancing bias, when the run used it
  tokenizer: Tokenizer
  step: int  # the checkpoint's step; 0 for an untrained model
  top_k: jax.Array  # int32 [layers]
  context: int  # the training sequence length


def load_run(workdir: str, *, step: int = -1, top_k: str = "", untrained: bool = False,
             seed: int = 0) -> LoadedRun:
  """The run in `workdir` at checkpoint `step` (-1: the latest), or its model freshly
  initialised with `untrained` (a chance-level baseline)."""
  directory = storage.join(storage.resolve(workdir), "checkpoints")
  if not storage.isdir(directory):
    raise ValueError(f"no checkpoints in {workdir!r}: train a run there first")
  checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise ValueError(f"no checkpoints in {workdir!r}: train a run there first")
    chosen = steps[-1] if step < 0 else step
    if chosen not in steps:
      raise ValueError(f"{workdir!r} has no checkpoint at step {step} (it has {steps})")
    saved = checkpointer.saved_config(chosen)
    trained_with = saved.pop("fingerprint", {}).get("tokenizer_sha256")
    settings = from_config(ml_collections.ConfigDict(saved))
    model_cfg = generate.inference_config(settings.model)
    tokenizer = load_tokenizer(settings.data.tokenizer)
    check_vocab(tokenizer, model_cfg.vocab_size)
    now = fingerprint(settings.data.tokenizer)["tokenizer_sha256"]
    if trained_with and now != trained_with:
      raise ValueError(f"the tokenizer file {settings.data.tokenizer!r} has changed since the "
                       f"run was trained (sha256 {now[:12]}..., trained with "
                       f"{trained_with[:12]}...): its ids would not match the model's")
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    # Only the parameters and the bias are read: the optimizer state's shape does not matter.
    graphdef, abstract, shardings = train_lib.abstract_sharded_state(model_cfg, optax.identity(),
                                                                     mesh)
    if untrained:
      params = train_lib.init_model(model_cfg, seed)[1]
      bias, chosen = None, 0
    else:
      state = checkpointer.restore_state(chosen, abstract_like(abstract, shardings),
                                         params_only=True)
      params = state.params
      bias = state.selection_bias if settings.balance.loss_free else None
  finally:
    checkpointer.close()
  layers = model_cfg.num_layers
  if top_k:
    per_layer = parse_per_layer(top_k)
    if len(per_layer) != layers or not all(1 <= k <= m for k, m in
                                           zip(per_layer, model_cfg.max_top_k_per_layer)):
      raise ValueError(f"--moe_top_k {top_k!r}: needs {layers} entries, each between 1 and the "
                       f"layer's maximum {list(model_cfg.max_top_k_per_layer)}")
  elif settings.schedule is not None:
    per_layer = list(settings.schedule.final)
  else:
    per_layer = [model_cfg.top_k] * layers
  return LoadedRun(settings._replace(model=model_cfg), graphdef, params, bias, tokenizer,
                   chosen, jnp.asarray(per_layer, jnp.int32), settings.train.seq_len)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """UTF-8 bytes of each token on its own (for bits per byte)."""
  return np.asarray([len(tokenizer.decode([i]).encode("utf-8"))
                     for i in range(tokenizer.vocab_size)], np.int64)
