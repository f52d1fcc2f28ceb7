"""Hugging Face Qwen3-MoE interop, checked against `transformers` itself (PyTorch, CPU): logits
of exported models, HF-initialised models imported here, bit-exact round trips, refusals, and
the 20B export planned on abstract shapes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from sigma_moe_jax import ModelConfig
from sigma_moe_jax.inference import generate
from sigma_moe_jax.inference.load import load_run
from sigma_moe_jax.interop import hf_runs as hf_interop
from sigma_moe_jax.interop import hf
from sigma_moe_jax.training import step as train_lib
from sigma_moe_jax.training.checkpoint import Checkpointer
from sigma_moe_jax.training.resume import fingerprint
from sigma_moe_jax.training.run_config import make_config
from sigma_moe_jax.training.settings import from_config, lr_and_optimizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(_REPO, "data", "shakespeare_bpe4096.json")
TINY = dict(vocab_size=4096, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            num_experts=8, d_ff=16, rope_theta=1000.0, norm_eps=1e-5)
# Rows of different lengths (right-padded): HF gets an attention mask, we get segment ids.
LENGTHS = (13, 7, 2)


def _write_run(workdir, cfg: ModelConfig, seed: int = 0, **config_overrides):
  """A run directory with one checkpoint of random parameters (every norm scale random too,
  so that a misplaced norm shows) and the shipped tokenizer."""
  config = make_config(cfg)
  config.data.tokenizer = TOKENIZER
  config.train.seq_len = 32
  for section, values in config_overrides.items():
    config[section].update(values)
  settings = from_config(config)
  _, params = train_lib.init_model(settings.model, seed)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape), params)
  _, optimizer = lr_and_optimizer(settings.train)
  state = train_lib.init_state(params, optimizer, settings.model)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1,
                              async_save=False)
  checkpointer.save(5, state, None, {**config.to_dict(), "fingerprint": fingerprint(TOKENIZER)},
                    force=True)
  checkpointer.close()
  return params


def _batch(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(LENGTHS), max(LENGTHS)), np.int32)
  for row, n in enumerate(LENGTHS):
    tokens[row, :n] = rng.integers(1, vocab, n)
  mask = (np.arange(tokens.shape[1]) < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return tokens, mask


def _our_logits(run, tokens, mask):
  model = nnx.merge(run.graphdef, run.params)
  logits, _ = model(jnp.asarray(tokens), jnp.asarray(mask), top_k=run.top_k)
  return np.asarray(logits)


def _hf_logits(directory, tokens, mask):
  model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(
      directory, dtype=torch.float32, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.numpy(), model


def _assert_real_positions_close(ours, theirs, mask, atol=1e-4):
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=0)


@pytest.mark.parametrize("model", [dict(top_k=1), dict(top_k=2, renormalize=True),
                                   dict(top_k=1, rope_scaling="yarn", rope_scaling_factor=2.0,
                                        rope_original_len=8)],
                         ids=["top1", "top2_renormalized", "top1_yarn"])
def test_exported_model_gives_our_logits_in_transformers(tmp_path, model):
  run_dir, out = str(tmp_path / "run"), str(tmp_path / "export")
  _write_run(run_dir, ModelConfig(**TINY, **model))
  run = load_run(run_dir)
  hf_interop.export(run, out, max_shard_bytes=200_000)  # several shards and an index
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["num_experts_per_tok"] == model["top_k"]
  assert config["norm_topk_prob"] == model.get("renormalize", False)
  assert (config["rope_scaling"] or {}).get("factor") == model.get("rope_scaling_factor")
  assert len(json.load(open(os.path.join(out, "model.safetensors.index.json")))
             ["weight_map"]) == len(hf.export_plan(run.settings.model, run.params))
  tokens, mask = _batch(TINY["vocab_size"])
  theirs, _ = _hf_logits(out, tokens, mask)
  _assert_real_positions_close(_our_logits(run, tokens, mask), theirs, mask)


def test_export_then_import_gives_every_parameter_bit_for_bit(tmp_path):
  run_dir, out, back = (str(tmp_path / n) for n in ("run", "export", "imported"))
  _write_run(run_dir, ModelConfig(**TINY, top_k=2))
  original = load_run(run_dir)
  hf_interop.export(original, out)
  hf_interop.import_model(out, back, make_config(ModelConfig()))
  imported = load_run(back)
  assert imported.settings.model == original.settings.model
  flat_a = jax.tree_util.tree_leaves_with_path(original.params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(imported.params))
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[path]), np.asarray(value),
                                  err_msg=jax.tree_util.keystr(path))
  # The imported run's tokenizer is the exported file, byte for byte.
  assert open(os.path.join(back, "tokenizer.json"), "rb").read() == open(TOKENIZER, "rb").read()


@pytest.mark.parametrize("per_expert_keys", [True, False], ids=["per_expert", "fused"])
def test_hf_initialised_model_imported_gives_hf_logits(tmp_path, per_expert_keys):
  """Both expert layouts transformers writes: one tensor per expert (the Hub's) and the fused
  gate_up_proj / down_proj of its in-memory model."""
  config = transformers.Qwen3MoeConfig(
      vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
      moe_intermediate_size=16, norm_topk_prob=True, rms_norm_eps=1e-5, rope_theta=5000.0,
      max_position_embeddings=64, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.Qwen3MoeForCausalLM(config).float()
  with torch.no_grad():  # random norm weights, so that a misplaced norm shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model.save_pretrained(hf_dir, save_original_format=per_expert_keys)
  keys = safe_open(os.path.join(hf_dir, "model.safetensors"), framework="flax").keys()
  assert ("model.layers.0.mlp.experts.0.up_proj.weight" in keys) == per_expert_keys
  hf_interop.import_model(hf_dir, workdir, make_config(ModelConfig()))
  run = load_run(workdir)
  assert run.settings.model.renormalize and [int(k) for k in run.top_k] == [2, 2]
  tokens, mask = _batch(4096, seed=1)
  theirs, _ = _hf_logits(hf_dir, tokens, mask)
  _assert_real_positions_close(_our_logits(run, tokens, mask), theirs, mask)


def test_greedy_continuation_matches_transformers(tmp_path):
  run_dir, out = str(tmp_path / "run"), str(tmp_path / "export")
  _write_run(run_dir, ModelConfig(**TINY, top_k=1))
  run = load_run(run_dir)
  hf_interop.export(run, out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  prompt = "ROMEO: But soft, what light"
  ids = run.tokenizer.encode(prompt)
  assert tokenizer(prompt)["input_ids"] == ids  # the same tokenizer, loaded by transformers
  prefill, decode = generate.make_generate(run.graphdef, 12, generate.Sampling(temperature=0.0),
                                           eos_id=None)
  tokens, lengths = generate.pad_prompts([ids])
  logits, cache = prefill(run.params, tokens, lengths, run.top_k)
  ours, _ = decode(run.params, logits, cache, lengths, run.top_k, jax.random.key(0))
  model = transformers.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
  theirs = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                          eos_token_id=None)[0, len(ids):].tolist()
  assert np.asarray(ours)[0].tolist() == theirs


def test_export_refuses_what_qwen3_moe_cannot_represent(tmp_path):
  run_dir = str(tmp_path / "run")
  _write_run(run_dir, ModelConfig(**TINY, gate_fn="sigmoid"),
             schedule={"top_k": "0:[2,1]"})
  with pytest.raises(ValueError) as error:
    hf_interop.export(load_run(run_dir), str(tmp_path / "out"))
  assert "top-k differs between layers ([2, 1])" in str(error.value)
  assert "model.gate_fn is 'sigmoid'" in str(error.value)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("change, named", [
    (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=True"),
    (dict(mlp_only_layers=[1]), "mlp_only_layers=[1]"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope scaling 'dynamic'"),
    # yarn imports with a factor and the original length (and the default betas) only
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn RoPE with settings other"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                        "beta_fast": 16}), "'beta_fast': 16"),
    (dict(model_type="qwen2_moe"), "model_type 'qwen2_moe'"),
])
def test_import_refuses_features_this_model_lacks(change, named):
  base = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
              num_experts_per_tok=1, moe_intermediate_size=16)
  hf.model_config_from_hf(base)  # the unchanged config imports
  with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
    hf.model_config_from_hf({**base, **change})


def test_20b_export_plan_on_abstract_shapes():
  """The paper's model: every key transformers loads, with its shape, and nothing allocated."""
  cfg = ModelConfig.sigma_moe_tiny()
  abstract = jax.eval_shape(lambda: train_lib.init_model(cfg, 0)[1])
  plan = hf.export_plan(cfg, abstract)
  d, f, hd, E, V = 1536, 768, 96, 96, 200_064
  expected = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,),
              "lm_head.weight": (V, d)}
  for l in range(56):  # written from the Qwen3-MoE layout, independently of hf.py
    p = f"model.layers.{l}."
    expected.update({p + "input_layernorm.weight": (d,),
                     p + "post_attention_layernorm.weight": (d,),
                     p + "self_attn.q_proj.weight": (16 * hd, d),
                     p + "self_attn.k_proj.weight": (4 * hd, d),
                     p + "self_attn.v_proj.weight": (4 * hd, d),
                     p + "self_attn.o_proj.weight": (d, 16 * hd),
                     p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                     p + "mlp.gate.weight": (E, d)})
    for e in range(E):
      expected.update({f"{p}mlp.experts.{e}.gate_proj.weight": (f, d),
                       f"{p}mlp.experts.{e}.up_proj.weight": (f, d),
                       f"{p}mlp.experts.{e}.down_proj.weight": (d, f)})
  assert {k: tuple(v.shape) for k, v in plan.items()} == expected
  total = sum(int(np.prod(v.shape)) for v in plan.values())
  assert total == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  sizes = {k: int(np.prod(v.shape)) * 2 for k, v in plan.items()}  # bfloat16
  shards = hf.plan_shards(sizes, 4 * 10**9)
  assert [n for shard in shards for n in shard] == list(plan)  # each tensor once, in order
  shard_bytes = [sum(sizes[n] for n in shard) for shard in shards]
  assert max(shard_bytes) <= 4 * 10**9
  assert len(shards) == -(-sum(shard_bytes) // (4 * 10**9))  # no shard left half empty


def test_bfloat16_export_is_the_float32_one_rounded(tmp_path):
  run_dir = str(tmp_path / "run")
  _write_run(run_dir, ModelConfig(**TINY, top_k=1))
  run = load_run(run_dir)
  full, half = str(tmp_path / "f32"), str(tmp_path / "bf16")
  hf_interop.export(run, full)
  hf_interop.export(run, half, dtype="bfloat16")
  assert json.load(open(os.path.join(half, "config.json")))["torch_dtype"] == "bfloat16"
  with safe_open(os.path.join(full, "model.safetensors"), framework="flax") as a, \
       safe_open(os.path.join(half, "model.safetensors"), framework="flax") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
      assert b.get_tensor(key).dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(b.get_tensor(key)),
                                    np.asarray(a.get_tensor(key).astype(jnp.bfloat16)))
  _, info = transformers.Qwen3MoeForCausalLM.from_pretrained(half, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_yarn_rope_scaling_survives_export_config_and_import():
  cfg = ModelConfig(**TINY, rope_scaling="yarn", rope_scaling_factor=2.0, rope_original_len=8)
  exported = hf.hf_config(cfg, top_k=1, max_position_embeddings=16, eos_token_id=0)
  back = hf.model_config_from_hf(exported)
  assert (back.rope_scaling, back.rope_scaling_factor, back.rope_original_len) == ("yarn", 2.0, 8)
  assert hf.model_config_from_hf(hf.hf_config(ModelConfig(**TINY), top_k=1,
                                              max_position_embeddings=16,
                                              eos_token_id=0)).rope_scaling == "none"
