"""Training throughput on this machine: tokens/s and MFU of the tiny and a ~100M config.

  python benchmarks/train.py [--steps 10] [--out results.json]

Times the real jitted train step (`llada_jax.train.compile_train_step`) on
random tokens after one warm-up step, next to the measured float32 matmul
FLOP/s of the device (the MFU denominator on CPU). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny  # noqa: E402
from llada_jax.config import ModelConfig  # noqa: E402
from llada_jax.training import flops as flops_lib  # noqa: E402
from llada_jax.training import train  # noqa: E402

# ~100M parameters: 12 layers of d_model 768 (85M) + a 32k vocabulary in and out (49M).
MODEL_100M = dict(d_model=768, n_heads=12, n_kv_heads=12, n_layers=12, mlp_hidden_size=2048,
                  vocab_size=32768, embedding_size=32768, max_sequence_length=1024)


def bench(name: str, model: dict, batch_size: int, seq_len: int, steps: int,
          peak: float) -> dict:
  cfg = tiny.get_config()
  cfg.model.update(model)
  cfg.update(batch_size=batch_size, seq_len=seq_len, total_steps=1000)
  model_cfg = ModelConfig.from_dict(cfg.model)
  mesh = train.make_mesh(cfg)
  step_fn, abstract, tx, _ = train.compile_train_step(cfg, model_cfg, mesh)
  state = train.init_state(cfg, model_cfg, abstract, tx)
  ids = jax.random.randint(jax.random.key(0), (batch_size, seq_len), 7, model_cfg.vocab_size)
  batch = jax.device_put({"input_ids": ids}, train.batch_sharding(mesh))
  t0 = time.perf_counter()
  state, m = step_fn(state, batch)
  float(m["loss"])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step_fn(state, batch)
    float(m["loss"])
  step_s = (time.perf_counter() - t0) / steps
  tokens_s = batch_size * seq_len / step_s
  model_flops_s = tokens_s * flops_lib.flops_per_token(model_cfg, seq_len) / jax.device_count()
  return {"config": name, "params": model_cfg.num_params(), "batch_size": batch_size,
          "seq_len": seq_len, "step_s": step_s, "first_step_s": compile_s,
          "tokens_per_s": tokens_s, "model_tflops_per_device": model_flops_s / 1e12,
          "mfu": model_flops_s / peak}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  peak = flops_lib.measured_matmul_flops(n=2048)
  results = {
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()],
                  "matmul_tflops_float32": peak / 1e12},
      "runs": [bench("tiny", dict(tiny.model_config()), 16, 128, args.steps, peak),
               bench("100M", MODEL_100M, 8, 256, max(2, args.steps // 5), peak)],
  }
  text = json.dumps(results, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
