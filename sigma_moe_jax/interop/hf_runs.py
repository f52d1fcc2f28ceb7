"""Hugging Face Qwen3-MoE checkpoints from runs and runs from them (the work behind
`sigma_moe_jax.cli.export_hf` and `sigma_moe_jax.cli.import_hf`; the format itself is in
sigma_moe_jax/interop/hf.py)."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.data.pipeline import check_vocab
from sigma_moe_jax.data.tokenizer import EOS_TOKEN, load_tokenizer
from sigma_moe_jax.infra import storage
from sigma_moe_jax.interop import hf
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.checkpoint import Checkpointer
from sigma_moe_jax.training.resume import fingerprint
from sigma_moe_jax.training.settings import from_config, lr_and_optimizer

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
  text = text.strip().upper()
  for unit, factor in _UNITS.items():
    if text.endswith(unit) and text[:-2].strip().replace(".", "", 1).isdigit():
      return int(float(text[:-2]) * factor)
  if text.isdigit():
    return int(text)
  raise ValueError(f"--max_shard_size {text!r}: give bytes or a number with KB, MB, GB or TB")


def export(run, out: str, *, dtype: str = "float32", max_shard_bytes: int = 4 * 10**9) -> dict:
  """Writes the loaded run's model to `out`; returns the index (total size, weight map)."""
  cfg = run.settings.model
  top_k = [int(k) for k in run.top_k]
  problems = hf.export_refusals(cfg, top_k, run.settings.balance.loss_free)
  if problems:
    raise ValueError(f"{hf.ARCHITECTURE} cannot represent this model: " + "; ".join(problems))
  target = jnp.dtype(dtype)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, target), run.params)
  plan = hf.export_plan(cfg, abstract)
  sizes = {name: int(np.prod(s.shape)) * target.itemsize for name, s in plan.items()}
  shards = hf.plan_shards(sizes, max_shard_bytes)
  files = hf.shard_names(len(shards))
  weight_map = {name: file for file, names in zip(files, shards) for name in names}
  storage.makedirs(out)
  pending, shard_index = {}, 0
  for _, group in hf.export_groups(cfg):
    for name, value in group(run.params).items():  # host copies: each tensor exists once here
      pending[name] = np.asarray(jax.device_get(jnp.asarray(value, target)))
    while shard_index < len(shards) and all(n in pending for n in shards[shard_index]):
      names = shards[shard_index]
      blob = safetensors.numpy.save({n: pending.pop(n) for n in names}, metadata={"format": "pt"})
      storage.write_bytes(storage.join(out, files[shard_index]), blob)
      shard_index += 1
  assert shard_index == len(shards) and not pending, "every tensor is written once"
  index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
  if len(files) > 1:
    storage.write_text(storage.join(out, "model.safetensors.index.json"),
                       json.dumps(index, indent=2))
  eos = run.tokenizer.eos_id
  storage.write_text(storage.join(out, "config.json"), json.dumps(hf.hf_config(
      cfg, top_k=top_k[0], max_position_embeddings=run.context, eos_token_id=eos,
      dtype=dtype), indent=2))
  storage.write_text(storage.join(out, "generation_config.json"), json.dumps(
      {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}, indent=2))
  write_tokenizer(run, out)
  return index


def write_tokenizer(run, out: str) -> None:
  """tokenizer.json (the run's, byte for byte) and a tokenizer_config.json that makes
  `AutoTokenizer` load it as it is (without a tokenizer class, transformers would build
  Qwen2's tokenizer from config.json's model type and re-tokenize digits)."""
  source = run.settings.data.tokenizer
  if not source.endswith(".json"):
    print(f"note: {source} is not a Hugging Face tokenizer.json; no tokenizer files written",
          flush=True)
    return
  storage.write_bytes(storage.join(out, "tokenizer.json"), storage.read_bytes(source))
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
      "bos_token": EOS_TOKEN, "model_max_length": run.context, "padding_side": "left",
      "clean_up_tokenization_spaces": False}
  data = run.settings.data
  if data.format == "chat":  # a fine-tuned model answers in the format it was trained on
    tokenizer_config["chat_template"] = storage.read_text(data.chat_template)
  storage.write_text(storage.join(out, "tokenizer_config.json"),
                     json.dumps(tokenizer_config, indent=2))


# Model settings that describe how the model runs, not what it is: taken from --config.
RUNTIME_FIELDS = ("dispatch", "grouped_matmul", "attention", "lbl_mode", "top1_lbl_tau",
                  "capacity_factor", "expert_exchange", "init_std", "embed_init_std", "dtype",
                  "remat")

_CONFIG_PY = '''"""The config of a model imported from {source} by sigma_moe_jax.cli.import_hf."""

import json

import ml_collections


def get_config():
  return ml_collections.ConfigDict(json.loads({text!r}))
'''


def read_tensors(hf_dir: str) -> dict:
  """{name: float32 array} of every safetensors file the directory's index names (or its one
  model.safetensors). A shard in a bucket is copied to a temporary file first."""
  index_path = storage.join(hf_dir, "model.safetensors.index.json")
  if storage.exists(index_path):
    files = sorted(set(json.loads(storage.read_text(index_path))["weight_map"].values()))
  elif storage.exists(storage.join(hf_dir, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise ValueError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
  tensors = {}
  for name in files:
    path = storage.join(hf_dir, name)
    with tempfile.TemporaryDirectory() as tmp:
      if storage.is_remote(path):
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
          f.write(storage.read_bytes(path))
        path = local
      with safe_open(path, framework="flax") as f:
        for key in f.keys():
          tensors[key] = jax.device_get(f.get_tensor(key).astype(jnp.float32))
  return tensors


def import_model(hf_dir: str, workdir: str, base) -> dict:
  """Writes the run; returns its config as a dict."""
  hf_config = json.loads(storage.read_text(storage.join(hf_dir, "config.json")))
  overrides = {k: base.model[k] for k in RUNTIME_FIELDS}
  model_cfg = hf.model_config_from_hf(hf_config, **overrides)
  config = base.to_dict()
  config["model"] = {**config["model"], **{
      f: getattr(model_cfg, f) for f in ModelConfig.__dataclass_fields__ if f != "max_top_k"}}
  config["schedule"]["top_k"] = ""  # model.top_k in every layer
  tokenizer_file = storage.join(hf_dir, "tokenizer.json")
  storage.makedirs(workdir)
  if storage.exists(tokenizer_file):
    config["data"]["tokenizer"] = storage.join(workdir, "tokenizer.json")
    storage.write_bytes(config["data"]["tokenizer"], storage.read_bytes(tokenizer_file))
  check_vocab(load_tokenizer(config["data"]["tokenizer"]), model_cfg.vocab_size)
  settings = from_config(ml_collections.ConfigDict(config))
  params = hf.params_from_hf(settings.model, read_tensors(hf_dir))
  _, optimizer = lr_and_optimizer(settings.train)
  state = train_lib.init_state(jax.tree.map(jnp.asarray, params), optimizer, settings.model)
  checkpointer = Checkpointer(storage.join(workdir, "checkpoints"), save_every=1, keep=1,
                              async_save=False)
  try:
    checkpointer.save(0, state, None, {**config, "fingerprint": fingerprint(
        config["data"]["tokenizer"])}, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()
  storage.write_text(storage.join(workdir, "config.py"), _CONFIG_PY.format(
      source=hf_dir, text=json.dumps(config, indent=1)))
  return config


