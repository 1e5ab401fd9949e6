"""Training throughput on this machine: the jitted step alone and the whole loop.

  python -m benchmarks.train [--configs tiny,100M] [--loss_vocab_chunk N]
      [--remat_policy none|full|save_dots|save_dots_no_batch] [--output out/train.json]

For the tiny config and a ~100M config, on random tokens:
  step  the real jitted step (`train.compile_train_step`), a few steps
        dispatched back to back then blocked on, after one warm-up step;
        seconds per step over repeats (min/median/max) and MFU against the
        device's float32 matmul peak (`flops.matmul_peak_flops`, as the trainer's MFU).
  loop  `train.train_and_evaluate` on pre-tokenized random documents: steps/s of
        each logging window (from the tokens/s the loop logs), the first window
        (compilation) dropped; min/median/max over windows. This includes the
        data pipeline, metric fetching and logging: the hot path of a run.
The load average before and after is recorded: the CPU may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from configs import tiny
from llada_jax.training import data as data_lib
from llada_jax.training import flops as flops_lib
from llada_jax.training import train
from llada_jax.config import ModelConfig
from llada_jax.models.llada import REMAT_POLICIES

# ~100M parameters: 12 layers of d_model 768 (85M) + a 32k vocabulary in and out (49M).
# remat "save_dots": backward recomputes the elementwise work (the attention softmax
# among it) from the saved matmul outputs; on this CPU that is faster than storing every
# activation ("none", the tiny config's) per layer: 7.66 vs 8.15 s a step
# (benchmarks/results/train.json, train_remat_none.json).
MODEL_100M = dict(d_model=768, n_heads=12, n_kv_heads=12, n_layers=12, mlp_hidden_size=2048,
                  vocab_size=32768, embedding_size=32768, max_sequence_length=1024,
                  remat_policy="save_dots")
# name -> (model overrides, batch, seq_len, steps per timing, repeats, loop windows,
#          steps per window); a 100M step takes about a minute on 2 shared cores.
SETUPS = {"tiny": ({}, 16, 128, 10, 5, 5, 10), "100M": (MODEL_100M, 8, 256, 1, 3, 3, 1)}


def _config(model: dict, batch_size: int, seq_len: int, loss_vocab_chunk: int = 0,
            remat_policy: str = ""):
  cfg = tiny.get_config()
  cfg.model.update(model)
  if remat_policy:
    cfg.model.remat_policy = remat_policy
  cfg.update(batch_size=batch_size, seq_len=seq_len, total_steps=1000)
  if loss_vocab_chunk:
    cfg.loss_vocab_chunk = loss_vocab_chunk
  return cfg


def bench_step(cfg, steps: int, repeats: int, peak: float) -> dict:
  """Seconds per jitted step, `steps` dispatched back to back per repeat."""
  model_cfg = ModelConfig.from_dict(cfg.model)
  mesh = train.make_mesh(cfg)
  step_fn, abstract, tx, _ = train.compile_train_step(cfg, model_cfg, mesh)
  state = train.init_state(cfg, model_cfg, abstract, tx)
  ids = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 7,
                           model_cfg.vocab_size)
  batch = jax.device_put({"input_ids": ids}, train.batch_sharding(mesh))
  t0 = time.perf_counter()
  state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step_fn(state, batch)
    jax.block_until_ready((state, m))
    times.append((time.perf_counter() - t0) / steps)
  step_s = common.stats(times)
  tokens = cfg.batch_size * cfg.seq_len
  flops = tokens * flops_lib.flops_per_token(model_cfg, cfg.seq_len) / jax.device_count()
  return {"first_step_s": first_s, "step_s": step_s, "steps_per_s": 1 / step_s["median"],
          "tokens_per_s": tokens / step_s["median"], "mfu": flops / step_s["median"] / peak}


def bench_loop(cfg, windows: int, window_steps: int, workdir: str) -> dict:
  """Steps/s of `train_and_evaluate` per logging window (first window dropped)."""
  rs = np.random.RandomState(0)
  vocab = cfg.model.vocab_size
  docs = [rs.randint(7, vocab, rs.randint(20, 400)) for _ in range(400)]
  source = os.path.join(workdir, "docs.array_record")
  data_lib.write_token_records(source, docs)
  cfg.update(total_steps=(windows + 1) * window_steps, log_every=window_steps, eval_every=0,
             eval_batches=1, eval_batch_size=cfg.batch_size, eval_samples=1, peak_flops=1e12)
  cfg.data.source = source
  cfg.optimizer.update(warmup_steps=2, decay_steps=0)
  cfg.tokenizer.train_vocab_size = 0
  cfg.samples.num = 0
  cfg.checkpoint.every_steps = 10 ** 6
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(cfg, os.path.join(workdir, "run"))
  tok_s = [float(t.replace(",", "")) for t in re.findall(r"tokens/s ([\d,]+)", out.getvalue())]
  if len(tok_s) != windows + 1:
    raise RuntimeError(f"expected {windows + 1} log lines, got:\n{out.getvalue()}")
  steps_s = [t / (cfg.batch_size * cfg.seq_len) for t in tok_s[1:]]
  return {"windows": windows, "steps_per_window": window_steps, "steps_per_s": common.stats(steps_s)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--configs", default="tiny,100M")
  ap.add_argument("--loss_vocab_chunk", type=int, default=0, help="0: the config's default")
  ap.add_argument("--remat_policy", default="", choices=("", *REMAT_POLICIES),
                  help="empty: each config's own (tiny none, 100M save_dots)")
  ap.add_argument("--output", default="")
  args = ap.parse_args()
  machine = common.machine()
  peak = flops_lib.matmul_peak_flops()
  runs = []
  for name in args.configs.split(","):
    model, batch, seq_len, steps, repeats, windows, window_steps = SETUPS[name]
    config = lambda: _config(model, batch, seq_len, args.loss_vocab_chunk,  # noqa: E731
                             args.remat_policy)
    run = {"config": name, "batch_size": batch, "seq_len": seq_len,
           "params": ModelConfig.from_dict(config().model).num_params(),
           "remat_policy": config().model.remat_policy,
           "loss_vocab_chunk": config().get("loss_vocab_chunk", 0)}
    run["step"] = bench_step(config(), steps, repeats, peak)
    with tempfile.TemporaryDirectory() as tmp:
      run["loop"] = bench_loop(config(), windows, window_steps, tmp)
    runs.append(run)
  common.write_json({"benchmark": "train", "machine": machine,
                     "matmul_flops_per_s_float32": peak, "runs": runs}, args.output)


if __name__ == "__main__":
  main()
