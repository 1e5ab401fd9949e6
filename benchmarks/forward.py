"""Forward throughput of the jitted LLaDA Transformer (not a test).

  python -m benchmarks.forward --config configs/tiny.py [--batch 8 --seq_len 256]
      [--config.model.dtype=bfloat16] [--output out/forward.json]

Reports tokens/s and achieved model FLOP/s (ModelConfig.forward_flops_per_token)
next to this machine's measured matmul FLOP/s, as JSON and a one-line summary.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.training import flops as flops_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per forward.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed forwards after a warm-up.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here.")


def run(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict:
  if seq_len > cfg.max_sequence_length:
    raise ValueError(f"--seq_len {seq_len} exceeds max_sequence_length {cfg.max_sequence_length}")
  model = model_lib.init(cfg)
  ids = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size)
  machine = common.machine()
  seconds = common.time_call(lambda: model(ids), repeats)
  tokens = batch * seq_len
  flops = cfg.forward_flops_per_token(seq_len) * tokens
  peak = flops_lib.matmul_peak_flops()
  return {
      "benchmark": "forward", "machine": machine,
      "model": {"params": cfg.num_params(), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                "dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
      "batch": batch, "seq_len": seq_len, "repeats": repeats, "seconds_per_forward": seconds,
      "tokens_per_s": common.per_second(tokens, seconds),
      "model_flops_per_s": common.per_second(flops, seconds),
      "matmul_flops_per_s_float32": peak,
      "fraction_of_matmul_peak": flops / seconds["median"] / peak,
  }


def main(argv):
  del argv
  cfg = ModelConfig.from_dict(_CONFIG.value.model)
  result = run(cfg, _BATCH.value, _SEQ_LEN.value, _REPEATS.value)
  common.write_json(result, _OUTPUT.value)
  print(f"forward: {result['tokens_per_s']['median']:,.0f} tokens/s (median), "
        f"{result['model_flops_per_s']['median'] / 1e9:.1f} GFLOP/s model FLOPs = "
        f"{100 * result['fraction_of_matmul_peak']:.0f}% of this machine's "
        f"{result['matmul_flops_per_s_float32'] / 1e9:.0f} GFLOP/s float32 matmul "
        f"({result['model']['params'] / 1e6:.1f}M params, batch {result['batch']} x "
        f"{result['seq_len']} tokens, {result['model']['dtype']})")


if __name__ == "__main__":
  app.run(main)
