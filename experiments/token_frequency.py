"""How much of a trained run's routing imbalance the most frequent tokens explain (issue 32's
token-frequency control), as JSON.

  python -m experiments.token_frequency --runs=runs/dropfree6/runs/lbl_seed3,... \
      --out=docs/results/token_frequency.json

Each run's last checkpoint routes its whole validation split (the documents its training held
out, packed as its evaluation packs them); every token's first choice in every layer is recorded
(top-1 runs: the expert the token is sent to). Per layer:

- `max_load_dev`: the most loaded expert's tokens over an even share, minus 1 (+2.49 = 3.49x);
- `frequent_share_of_top_expert`: the share of that expert's tokens that are one of the `--top`
  most frequent validation tokens (in this corpus: end of line, comma, full stop);
- `top_expert_holds_of_frequent`: the share of those frequent tokens' occurrences the most
  loaded expert receives;
- `max_load_dev_without_frequent`: the same max-load statistic over the other tokens only, their
  even share recomputed: the imbalance that is left once the frequent tokens are set aside;
- `most_frequent_token_on_one_expert`: the share of the most frequent token's occurrences that
  its most common expert receives (1.0: routed by identity), and `its_expert_load_rank` that
  expert's rank by load (0: the most loaded);
- `f_cv`, `p_cv`, `corr_f_p`: the load f (each expert's share of the tokens) and the mean
  router probability p, as the LBL forms them: their spread across experts and their correlation
  (with `--untrained`, of the model as initialised: whether a flat p is learned or where the
  router started);
- `floor`: the max-load deviation a router that sent every occurrence of the most frequent
  token to one expert (and spread the rest evenly) would show: share x experts - 1.

Setting the frequent tokens aside after training is not the same as training without them (a
run whose end-of-line token is merged into the next one); it says whether the rest of the
tokens are balanced under the router that was trained.
"""

import collections
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from sigma_moe_jax.cli import common as cli_lib
from sigma_moe_jax.data.pipeline import (load_documents, make_pipeline, split_documents,
                                         validation_piece_chars)
from sigma_moe_jax.inference.load import load_run
from sigma_moe_jax.infra import storage
from sigma_moe_jax.moe.routing import router_logits
from sigma_moe_jax.training.step import init_model

_RUNS = flags.DEFINE_list("runs", None, "Run directories (each with checkpoints).")
_OUT = flags.DEFINE_string("out", None, "Write the JSON here (and print it).")
_TOP = flags.DEFINE_integer("top", 3, "How many of the most frequent tokens are set aside.")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Each run's model as initialised (its "
                               "train.seed), before any training: f and p at the start.")


def choice_fn(run):
  """A jitted batch -> (int32 [layers, batch, seq]: each token's first-choice expert in every
  layer, the loss-free bias added to the scores where the run used it; float32 [layers,
  experts]: the router's softmax probabilities summed over the batch's tokens)."""
  cfg = run.settings.model

  @jax.jit
  def choices(params, tokens, segments, positions):
    model = nnx.merge(run.graphdef, params)
    token_mask = segments > 0

    def step(block, x, row, max_top_k):
      top_k, bias = row
      attended, _ = block.attn(block.attn_norm(x), positions, segments)
      logits = router_logits(block.moe_norm(x + attended), block.moe.router[...])
      scores = jax.nn.sigmoid(logits) if cfg.gate_fn == "sigmoid" else logits
      scores = scores if bias is None else scores + bias
      x, _, _ = block(x, positions, segments, token_mask, top_k, max_top_k, bias)
      probs = jnp.where(token_mask[..., None], jax.nn.softmax(logits, axis=-1), 0.0)
      return x, (jnp.argmax(scores, axis=-1).astype(jnp.int32), jnp.sum(probs, axis=(0, 1)))

    x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
    return model.scan_layers(x, step, (run.top_k, run.selection_bias))[1]

  def call(batch):
    ids, prob_sums = choices(run.params, *(jnp.asarray(batch[k]) for k in (
        "tokens", "segment_ids", "positions")))
    return np.asarray(ids), np.asarray(prob_sums)
  return call


def validation_batches(run):
  data, t = run.settings.data, run.settings.train
  docs = load_documents(cli_lib.project_path(data.path))
  val = split_documents(docs, data.val_fraction, data.seed,
                        validation_piece_chars(data.chunk_chars))[1]
  return make_pipeline(val, run.tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
                       seed=data.seed, shuffle=False, repeat=False)


def max_dev(counts: np.ndarray) -> float:
  total = counts.sum()
  return float(counts.max() / (total / len(counts)) - 1) if total else 0.0


def layer_statistics(choices: np.ndarray, tokens: np.ndarray, frequent_ids, experts: int) -> dict:
  """One layer's statistics (the module docstring) from every token's first choice [tokens] and
  id [tokens]; `frequent_ids` most frequent first."""
  counts = np.bincount(choices, minlength=experts)
  busiest = int(np.argmax(counts))
  to_busiest = choices == busiest
  frequent = np.isin(tokens, frequent_ids)
  commonest = np.bincount(choices[tokens == frequent_ids[0]], minlength=experts)
  return {
      "max_load_dev": max_dev(counts),
      "most_loaded_expert": busiest,
      "frequent_share_of_top_expert": float(frequent[to_busiest].mean()),
      "top_expert_holds_of_frequent": float(to_busiest[frequent].mean()),
      "max_load_dev_without_frequent": max_dev(np.bincount(choices[~frequent],
                                                           minlength=experts)),
      "load_cv": float(counts.std() / counts.mean()),
      "empty_experts": int((counts == 0).sum()),
      "most_frequent_token_on_one_expert": float(commonest.max() / max(1, commonest.sum())),
      "its_expert_load_rank": int(np.argsort(-counts, kind="stable").tolist().index(
          int(np.argmax(commonest)))),
  }


def cv(values: np.ndarray) -> float:
  return float(values.std() / values.mean())


def analyse(workdir: str, top: int, untrained: bool = False) -> dict:
  run = load_run(workdir, untrained=untrained)
  if untrained:  # the model as this run initialised it (its seed), before its first step
    run = run._replace(params=init_model(run.settings.model, run.settings.train.seed)[1])
  experts = run.settings.model.num_experts
  tokens, choices, prob_sums, first_choices = [], [], 0.0, choice_fn(run)
  for batch in validation_batches(run):
    keep = np.asarray(batch["segment_ids"]) > 0
    ids, sums = first_choices(batch)
    tokens.append(np.asarray(batch["tokens"])[keep])
    choices.append(ids[:, keep])
    prob_sums = prob_sums + sums
  tokens, choices = np.concatenate(tokens), np.concatenate(choices, axis=1)
  # f and p as the LBL forms them: each expert's share of the tokens, its mean probability.
  f = np.stack([np.bincount(c, minlength=experts) for c in choices]) / len(tokens)
  p = prob_sums / len(tokens)
  frequency = collections.Counter(tokens.tolist())
  frequent_ids = [i for i, _ in frequency.most_common(top)]
  layers = [layer_statistics(c, tokens, frequent_ids, experts) for c in choices]
  share = lambda i: frequency[i] / len(tokens)
  return {
      "run": workdir, "step": run.step, "validation_tokens": int(len(tokens)),
      "frequent_tokens": [{"token": run.tokenizer.decode([i]), "id": int(i), "share": share(i)}
                          for i in frequent_ids],
      "frequent_share_of_tokens": float(np.isin(tokens, frequent_ids).mean()),
      "floor": share(frequent_ids[0]) * experts - 1,
      "per_layer": {**{key: [layer[key] for layer in layers] for key in layers[0]},
                    "f_cv": [cv(row) for row in f], "p_cv": [cv(row) for row in p],
                    "corr_f_p": [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(f, p)]},
  }


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not _RUNS.value:
    sys.exit("error: --runs names no run directory")
  try:
    results = {"runs": [analyse(w, _TOP.value, _UNTRAINED.value) for w in _RUNS.value]}
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  per_layer = [r["per_layer"] for r in results["runs"]]
  results["mean_over_runs"] = {key: np.mean([p[key] for p in per_layer], axis=0).tolist()
                               for key in per_layer[0] if key != "most_loaded_expert"}
  text = json.dumps(results, indent=1)
  if _OUT.value:
    storage.write_text(storage.resolve(_OUT.value), text + "\n")
  print(text)


if __name__ == "__main__":
  cli_lib.run(main)
