"""Block-diffusion sampling (LLaDA2.x): the exact block KV cache vs recomputing the canvas.

  python -m benchmarks.block_sampling [--batches 1,8] [--gen_length 256]
      [--block_length 32] [--prompt_len 32] [--repeats 3] [--output out/block_sampling.json]
  python -m benchmarks.block_sampling --checkpoint runs/block_sft_llada2/block_sft
      [--task DIR] [--num_test 64] [--thresholds 0.95,2]

Both run `sampling/block.py` on the same small LLaDA2-shaped model with random
weights (4 layers: 1 dense + 3 MoE of 16 experts, top-4 in 2 of 4 groups, a
shared expert; 8 query / 2 kv heads of 32, half-rotary RoPE) and the same
prompts, greedy, threshold 2 (above 1: no token ever passes it, so every
iteration commits its quota of 1 and both make the same model calls): once with
the block cache (the prompt prefilled once, each committed block cached) and
once recomputing the whole canvas every iteration under the same block-causal
mask (kv_cache=False, what the official code does, but at a static length).
Reports, per batch, tokens/s (batch x gen_length / wall seconds; min, median,
max of --repeats after a warm-up call that compiles), model calls, tokens per
model call, whether the tokens agree, and the load average (the CPU may be shared).

--checkpoint: a trained LLaDA2 (`benchmarks.block_sft --family=llada2`) on
that task's held-out prompts (chat template, left-padded, the first 1 and 8)
at its gen_length 16 / block 8, steps 8, per --thresholds (0.95: parallel
commits; 2: one canvas position per iteration, the canvas being whole blocks
so a few more than gen_length), the same columns plus exact-match accuracy
and NFE per token on --num_test lists, cached and recomputed.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
from absl import app, flags

from benchmarks import block_sft
from benchmarks import common
from benchmarks import fast_sampling
from llada_jax import models
from llada_jax.config import ModelConfig
from llada_jax.frontends import settings as frontend
from llada_jax.sampling import block

FLAGS = flags.FLAGS

SMALL_LLADA2 = dict(
    family="llada2", d_model=256, n_heads=8, n_kv_heads=2, explicit_head_dim=32, n_layers=4,
    mlp_hidden_size=512, vocab_size=4096, embedding_size=4096, max_sequence_length=1024,
    rope_theta=600000.0, rms_norm_eps=1e-6, qk_norm=True, partial_rotary_factor=0.5,
    num_experts=16, num_experts_per_tok=4, moe_hidden_size=128, shared_expert_hidden_size=128,
    moe_layers=(0, 1, 1, 1), expert_bias=True, router="sigmoid_grouped", n_group=4,
    topk_group=2, routed_scaling_factor=2.5, mask_token_id=4095, eos_token_id=4094,
    pad_token_id=4094, bos_token_id=None, eot_token_id=None)


def _define_flags():
  flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
  flags.DEFINE_integer("gen_length", 256, "Tokens to generate (random weights).")
  flags.DEFINE_integer("block_length", 32, "Block length (random weights).")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (random weights).")
  flags.DEFINE_integer("repeats", 3, "Timed runs per sampler and batch.")
  flags.DEFINE_string("checkpoint", None, "A trained LLaDA2 model dir (benchmarks.block_sft "
                      "--family=llada2's block_sft stage): the trained rows instead.")
  flags.DEFINE_string("task", None, "With --checkpoint: block_sft's task dir (default: the one "
                      "task_* dir next to --checkpoint).")
  flags.DEFINE_integer("num_test", 64, "With --checkpoint: held-out lists scored.")
  flags.DEFINE_list("thresholds", ["0.95", "2"], "With --checkpoint: commit thresholds.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def compare(model, prompt, mask, args: dict, repeats: int) -> dict:
  """One row: `block.generate(**args)` on `prompt` [B, P] (`mask` its left padding)
  cached vs recompute: seconds, tokens/s, model calls, tokens per call, same tokens."""
  batch, gen_length = prompt.shape[0], args["gen_length"]
  row, outs = {"batch": batch, "loadavg_before": common.load_average()}, {}
  for name, kv_cache in (("cached", True), ("recompute", False)):
    call = lambda kv=kv_cache: block.generate(model, prompt, mask, kv_cache=kv,
                                              return_nfe=True, **args)
    tokens, nfe = call()  # warm-up (compiles)
    seconds = common.time_call(call, repeats, warmup=0)
    outs[name] = np.asarray(tokens)
    row[name] = {"seconds": seconds,
                 "tokens_per_s": common.per_second(batch * gen_length, seconds),
                 "model_calls": nfe, "tokens_per_model_call": gen_length / nfe}
  row["speedup"] = row["recompute"]["seconds"]["median"] / row["cached"]["seconds"]["median"]
  row["same_tokens"] = bool(np.array_equal(outs["cached"], outs["recompute"]))
  row["loadavg_after"] = common.load_average()
  return row


def run(cfg: ModelConfig, batches, gen_length: int, block_length: int, prompt_len: int,
        repeats: int) -> dict:
  """The random-weight rows: `cfg` initialised, random prompts, threshold 2."""
  model = models.init(cfg)
  machine = common.machine()
  args = dict(gen_length=gen_length, block_length=block_length, steps=block_length,
              threshold=2.0)
  results = []
  for batch in batches:
    prompt = np.asarray(jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                                           cfg.vocab_size - 2))
    row = compare(model, prompt, None, args, repeats)
    results.append({"batch": batch, "gen_length": gen_length, "block_length": block_length,
                    "prompt_len": prompt_len, **row})
  return {"benchmark": "block_sampling", "machine": machine,
          "model": {"params": cfg.num_params(), "active_params": cfg.num_params(active=True),
                    **{k: v for k, v in cfg.to_dict().items() if k in SMALL_LLADA2}},
          "results": results}


def find_task(checkpoint: str, task: str | None) -> str:
  """`task`, else the one task_* dir next to `checkpoint` (block_sft's layout)."""
  if task is None:
    found = glob.glob(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "task_*"))
    if len(found) != 1:
      raise ValueError(f"task: {len(found)} task_* dirs next to --checkpoint={checkpoint}; "
                       "name block_sft's task dir")
    task = found[0]
  paths = fast_sampling.task_paths(task)
  for name in ("test", "tokenizer"):
    if not os.path.exists(paths[name]):
      raise ValueError(f"task: {task} has no {paths[name]} (not a block_sft task dir)")
  return task


def run_trained(checkpoint: str, task: str, batches, thresholds, num_test: int,
                repeats: int) -> dict:
  """The trained rows: block_sft's held-out prompts (chat template, left-padded) at its
  gen_length / block_length, per threshold and batch, with exact-match accuracy over
  num_test lists (batches of 8) cached and recomputed."""
  model = block_sft.load_model(checkpoint, "llada2")
  tok, records, _ = block_sft.load_task(fast_sampling.task_paths(task), num_test)
  machine = common.machine()
  ids = fast_sampling.prompt_ids(tok, records)
  results = []
  for threshold in thresholds:
    mode = {"steps": block_sft.BLOCK_LENGTH, "threshold": threshold}
    args = dict(gen_length=block_sft.GEN_LENGTH, block_length=block_sft.BLOCK_LENGTH, **mode)
    scores = {name: block_sft.accuracy(model, tok, records, {**mode, "kv_cache": kv})
              for name, kv in (("cached", True), ("recompute", False))}
    for batch in batches:
      rows = ids[:batch]
      prompt, mask = frontend.left_pad(rows, max(map(len, rows)), tok.pad_id)
      row = compare(model, prompt, mask, args, repeats)
      for name, score in scores.items():
        row[name].update(accuracy=score["accuracy"], nfe_per_token=score["nfe_per_token"])
      results.append({"threshold": threshold, **row})
  return {"benchmark": "block_sampling", "machine": machine, "checkpoint": checkpoint,
          "task": task, "num_test": len(records), "gen_length": block_sft.GEN_LENGTH,
          "block_length": block_sft.BLOCK_LENGTH,
          "model": {"params": model.config.num_params(),
                    "active_params": model.config.num_params(active=True)},
          "results": results}


def main(argv):
  del argv
  batches = [int(b) for b in FLAGS.batches]
  if FLAGS.checkpoint:
    result = run_trained(FLAGS.checkpoint, find_task(FLAGS.checkpoint, FLAGS.task), batches,
                         [float(t) for t in FLAGS.thresholds], FLAGS.num_test, FLAGS.repeats)
  else:
    result = run(ModelConfig.from_dict(SMALL_LLADA2), batches, FLAGS.gen_length,
                 FLAGS.block_length, FLAGS.prompt_len, FLAGS.repeats)
  common.report(result, FLAGS.output, summary)


def summary(r: dict) -> str:
  """One result row as a line: the median rates, model calls, speedup of the medians
  (trained rows: the threshold first, the accuracies last)."""
  line = f"threshold {r['threshold']:g}, " if "threshold" in r else ""
  line += (f"batch {r['batch']}: cached {r['cached']['tokens_per_s']['median']:.1f} tok/s "
          f"({r['cached']['model_calls']} calls), recompute "
          f"{r['recompute']['tokens_per_s']['median']:.1f} tok/s "
          f"({r['recompute']['model_calls']} calls), x{r['speedup']:.2f} (medians), "
          f"same tokens: {r['same_tokens']}")
  if "accuracy" in r["cached"]:
    line += (f", accuracy {r['cached']['accuracy']:.1%} / {r['recompute']['accuracy']:.1%} "
             "(cached / recompute)")
  return line


if __name__ == "__main__":
  _define_flags()
  app.run(main)
