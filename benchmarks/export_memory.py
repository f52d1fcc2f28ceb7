"""Memory of a Hugging Face export: what `sigma_moe_jax.cli.export_hf` adds to the loaded model.

  python -m benchmarks.export_memory [--layers=8 --d_model=512 --experts=32 --d_ff=512]

Writes a run with one checkpoint of a model of that size, loads it as the exporter does
(parameters only), then exports it in 100 MB shards while a thread samples the process's resident
memory. Prints the model's size, the largest layer and shard, and the peak resident memory
during the export above the memory before it: streaming layer by layer should add about one
layer and one shard, not a second copy of the model.
"""

import os
import tempfile
import threading
import time

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 8, "Layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.")
_EXPERTS = flags.DEFINE_integer("experts", 32, "Experts per layer.")
_D_FF = flags.DEFINE_integer("d_ff", 512, "Expert width.")
_SHARD = 100 * 10**6


def resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
  def __init__(self, interval: float = 0.002):
    self.peak, self.interval, self._stop = 0, interval, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, resident_bytes())
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, resident_bytes())


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415 -- after the platform is set
  import numpy as np  # noqa: PLC0415

  from sigma_moe_jax.training.run_config import make_config  # noqa: PLC0415
  from sigma_moe_jax.interop.hf_runs import export  # noqa: PLC0415
  from sigma_moe_jax.inference.load import load_run  # noqa: PLC0415
  from sigma_moe_jax.training.resume import fingerprint  # noqa: PLC0415
  from sigma_moe_jax.training.settings import from_config, lr_and_optimizer  # noqa: PLC0415
  from sigma_moe_jax import ModelConfig, hf  # noqa: PLC0415
  from sigma_moe_jax.training import step as train_lib  # noqa: PLC0415
  from sigma_moe_jax.training.checkpoint import Checkpointer  # noqa: PLC0415

  cfg = ModelConfig(vocab_size=4096, d_model=_D_MODEL.value, num_layers=_LAYERS.value,
                    num_heads=8, num_kv_heads=2, num_experts=_EXPERTS.value, d_ff=_D_FF.value)
  config = make_config(cfg)
  config.data.tokenizer = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "data", "shakespeare_bpe4096.json")
  settings = from_config(config)
  with tempfile.TemporaryDirectory() as tmp:
    state = train_lib.init_state(train_lib.init_model(cfg, 0)[1],
                                 lr_and_optimizer(settings.train)[1], cfg)
    checkpointer = Checkpointer(os.path.join(tmp, "run", "checkpoints"), save_every=1, keep=1,
                                async_save=False)
    checkpointer.save(1, state, None, {**config.to_dict(),
                                       "fingerprint": fingerprint(config.data.tokenizer)})
    checkpointer.close()
    del state, checkpointer
    run = load_run(os.path.join(tmp, "run"))
    jax.block_until_ready(run.params)
    model_bytes = sum(a.nbytes for a in jax.tree.leaves(run.params))
    plan = hf.export_plan(cfg, run.params)
    layer_bytes = sum(int(np.prod(s.shape)) * 4 for n, s in plan.items()
                      if n.startswith("model.layers.0."))
    outer_bytes = sum(int(np.prod(s.shape)) * 4 for n, s in plan.items()
                      if not n.startswith("model.layers."))
    before = resident_bytes()
    with PeakSampler() as sampler:
      index = export(run, os.path.join(tmp, "export"), max_shard_bytes=_SHARD)
    added = sampler.peak - before
  mb = lambda b: f"{b / 1e6:,.0f} MB"
  print(f"model {mb(model_bytes)} in {cfg.num_layers} layers; largest group: one layer "
        f"{mb(layer_bytes)}, embedding and output {mb(outer_bytes)}; shards of at most "
        f"{mb(_SHARD)} ({len(set(index['weight_map'].values()))} files)")
  print(f"resident before the export {mb(before)}; peak during it {mb(sampler.peak)}: "
        f"+{mb(added)}, {added / model_bytes:.2f}x the model")


if __name__ == "__main__":
  app.run(main)
