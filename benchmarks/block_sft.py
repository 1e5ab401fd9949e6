"""Block-diffusion SFT on a task with measurable accuracy: does `block_sft` keep it?

  python -m benchmarks.block_sft [--family llada] [--workdir runs/block_sft]
      [--output out/block_sft.json] [--sft_steps 400] [--block_steps 150] [--cap_weight 0.5] [--num_test 64] [--skip_train]
      [--digits 6,10]

1. Task: `benchmarks.fast_sampling`'s (sort --digits = 6–10 digits, "3141592" ->
   "1123459"; a list is held out when the MD5 of its text is 0 mod 10), its
   300-token SentencePiece vocabulary, rows of prompt + 16 positions.
2. `sft`: a configs/tiny.py-shaped LLaDA trained from scratch with the trainer
   (`kind=sft`, --sft_steps); --family=llada2: LLADA2_MODEL instead (tiny's
   sizes and ids, LLaDA2's MoE layers, router, q/k norm, half rotary; default
   workdir runs/block_sft_llada2), whose `generate` is the block sampler.
3. `block_sft`: that model fine-tuned with `kind=block_sft` (block 8,
   complementary masking, --block_steps); `block_sft_cap`: the same with the
   CAP term (--cap_weight). Both from the `sft` workdir, same seeds.
4. Each model (and the `sft` one before stage 3) on --num_test held-out lists:
   exact-match accuracy with semi-autoregressive `generate` (gen_length 16,
   block 8) at steps = gen_length, and with threshold 0.9 decoding together
   with its NFE per generated token (what CAP's sharper predictions should
   lower); llada2: the block sampler (steps 8 per block) at threshold 2 (one
   position per iteration) and 0.95 (MODES). Non-timing figures; JSON to stdout (and --output) with the
   training wall seconds and the load average.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from benchmarks import common
from benchmarks import fast_sampling
import llada_jax
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.frontends import settings as frontend
from llada_jax.training import train as train_lib

FLAGS = flags.FLAGS
GEN_LENGTH, BLOCK_LENGTH = 16, 8
# Decoding modes per family. llada: semi-autoregressive `generate`, one token per
# step, then threshold 0.9. llada2 (the block sampler, whose `steps` is per block
# and whose threshold defaults to 0.95): threshold 2 commits exactly one token
# per iteration (no confidence exceeds it), then the family default 0.95.
MODES = {"llada": ({"steps": GEN_LENGTH}, {"steps": GEN_LENGTH, "threshold": 0.9}),
         "llada2": ({"steps": BLOCK_LENGTH, "threshold": 2.0},
                    {"steps": BLOCK_LENGTH, "threshold": 0.95})}
# The LLaDA2 architecture at configs/tiny.py's sizes: layer 0 dense, the others MoE
# (8 experts of 128, top-2 within the best 2 of 4 groups, sigmoid router with a
# selection bias, weights x 2.5, a shared expert of 128: 384 active hidden units,
# tiny's dense FFN), per-head q/k RMSNorm, RoPE over half of each head.
LLADA2_MODEL = dict(family="llada2", qk_norm=True, partial_rotary_factor=0.5,
                    rope_theta=600000.0, rms_norm_eps=1e-6, num_experts=8,
                    num_experts_per_tok=2, moe_hidden_size=128, shared_expert_hidden_size=128,
                    expert_bias=True, router="sigmoid_grouped", n_group=4, topk_group=2,
                    routed_scaling_factor=2.5)


def _define_flags():
  flags.DEFINE_enum("family", "llada", tuple(MODES), "Model trained: configs/tiny.py's dense "
                    "LLaDA, or LLADA2_MODEL (block sampler).")
  flags.DEFINE_string("workdir", None, "Data, tokenizer and training runs (default: "
                      "runs/block_sft, runs/block_sft_llada2 for --family=llada2).")
  flags.DEFINE_integer("sft_steps", 400, "SFT steps from scratch (stage 2), batch 32.")
  flags.DEFINE_integer("block_steps", 150, "block_sft steps from the SFT model (stage 3), "
                       "batch 16 (32 rows with the complements).")
  flags.DEFINE_float("cap_weight", 0.5, "CAP weight of the block_sft_cap run (0: no such run).")
  flags.DEFINE_integer("num_test", 64, "Held-out lists scored per model and mode.")
  flags.DEFINE_list("digits", ["6", "10"], "Shortest and longest list to sort (vrpo_e2e: 4,6).")
  flags.DEFINE_bool("skip_train", False, "Use the trained models already in --workdir.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def accuracy(model, tok, records, mode: dict) -> dict:
  """Exact-match accuracy and NFE per generated token of `mode` (batches of 8)."""
  ids = fast_sampling.prompt_ids(tok, records)
  correct, nfe_sum, batches = 0, 0, 0
  for start in range(0, len(ids), 8):
    rows = ids[start:start + 8]
    width = max(map(len, rows))
    x, mask = frontend.left_pad(rows, width, tok.pad_id, num_rows=8)
    out, nfe = llada_jax.generate(model, x, mask, gen_length=GEN_LENGTH,
                                  block_length=BLOCK_LENGTH, return_nfe=True, **mode)
    out = np.asarray(out)
    for r, rec in enumerate(records[start:start + 8]):
      correct += tok.decode(out[r, width:].tolist()).strip() == rec["response"]
    nfe_sum, batches = nfe_sum + nfe, batches + 1
  return {"mode": mode, "accuracy": correct / len(records),
          "nfe_per_token": nfe_sum / batches / GEN_LENGTH}


def train_config(family: str, paths, **kwargs):
  """fast_sampling's SFT config (`kwargs`: its), the model LLADA2_MODEL for llada2."""
  cfg = fast_sampling.train_config(paths, **kwargs)
  if family == "llada2":
    cfg.model.update(LLADA2_MODEL, moe_layers=[0] + [1] * (cfg.model.n_layers - 1))
  return cfg


def block_config(family: str, paths, seq_len: int, steps: int, init_from: str,
                 cap_weight: float):
  """`train_config` turned into block_sft from `init_from`."""
  cfg = train_config(family, paths, seq_len=seq_len, steps=steps, batch_size=16, lr=1e-3,
                     init_from=init_from)
  cfg.kind, cfg.block_length, cfg.complementary_masking = "block_sft", BLOCK_LENGTH, True
  cfg.cap_weight = cap_weight
  return cfg


def task_dir(workdir: str, lengths: tuple[int, int]) -> str:
  """Where `run` writes the task (train/test JSONL, tokenizer) under `workdir`."""
  return os.path.join(os.path.abspath(workdir), f"task_{lengths[0]}_{lengths[1]}")


def load_task(paths, num_test: int):
  """(tokenizer, the first num_test held-out records, seq_len: prompt + GEN_LENGTH
  in whole blocks of BLOCK_LENGTH)."""
  tok = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  with open(paths["test"]) as f:
    records = [json.loads(line) for line in f][:num_test]
  prompt_len = max(len(p) for p in fast_sampling.prompt_ids(tok, records))
  return tok, records, -(-(prompt_len + GEN_LENGTH) // BLOCK_LENGTH) * BLOCK_LENGTH


def load_model(path: str, family: str):
  """The trained model in `path`; ValueError if it is not of `family`."""
  model = llada_jax.load(path)
  if model.config.family != family:
    raise ValueError(f"family: {path} holds a {model.config.family!r} model, not {family!r} "
                     "(another --workdir, or the matching --family)")
  return model


def run(workdir: str, *, family: str, lengths: tuple[int, int], sft_steps: int,
        block_steps: int, cap_weight: float, num_test: int, skip_train: bool) -> dict:
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  machine = common.machine()  # the load average before any work
  paths = fast_sampling.make_task(task_dir(workdir, lengths), num_train=50_000, num_test=500,
                                  lengths=lengths)
  tok, records, seq_len = load_task(paths, num_test)
  names = ("sft", "block_sft") + (("block_sft_cap",) if cap_weight else ())
  runs = {name: os.path.join(workdir, name) for name in names}
  seconds = {}
  if not skip_train:
    start = time.perf_counter()
    train_lib.train_and_evaluate(train_config(
        family, paths, seq_len=seq_len, steps=sft_steps, batch_size=32, lr=3e-3), runs["sft"])
    seconds["sft"] = time.perf_counter() - start
    for name, cap in (("block_sft", 0.0), ("block_sft_cap", cap_weight))[:len(runs) - 1]:
      start = time.perf_counter()
      train_lib.train_and_evaluate(
          block_config(family, paths, seq_len, block_steps, runs["sft"], cap), runs[name])
      seconds[name] = time.perf_counter() - start
  results, params = {}, None
  for name, path in runs.items():
    model = load_model(path, family)
    params = model.config.num_params()
    results[name] = [accuracy(model, tok, records, mode) for mode in MODES[family]]
    print(json.dumps({name: results[name]}), flush=True)
  return {"task": "sort %d-%d digits" % lengths, "family": family, "params": params,
          "gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "seq_len": seq_len,
          "num_test": len(records), "sft_steps": sft_steps, "block_steps": block_steps,
          "cap_weight": cap_weight, "train_seconds": seconds,
          "load_average": os.getloadavg(), "machine": machine, "results": results}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  default = "runs/block_sft" + ("_llada2" if FLAGS.family == "llada2" else "")
  lo, hi = (int(d) for d in FLAGS.digits)
  common.write_json(run(FLAGS.workdir or default, family=FLAGS.family, lengths=(lo, hi),
                        sft_steps=FLAGS.sft_steps, block_steps=FLAGS.block_steps,
                        cap_weight=FLAGS.cap_weight, num_test=FLAGS.num_test,
                        skip_train=FLAGS.skip_train), FLAGS.output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
