"""Fast sampling on a model with measurable accuracy: KV caches × decoding rules.

  python -m benchmarks.fast_sampling --workdir runs/fast_sampling [--output out/fast_sampling.json]
      [--stage1_steps 1500] [--stage2_steps 200] [--num_test 200] [--skip_train]

1. Task (train/test split by construction): sort a list of 6–10 digits
   ("3141592" -> "1123459"); a list is held out when the MD5 of its text is
   0 mod 10, so no test list is ever trained on.
2. Training with the project's trainer (`llada_jax.train`, SFT, configs/tiny.py
   shapes with a 300-token SentencePiece vocabulary): stage 1 on short rows
   (prompt + answer + a little EOS padding, cheap), stage 2 fine-tunes on rows
   of prompt + 256 positions, so the model knows the long EOS tail it meets at
   gen_length 256. Both stages are resumable workdirs under --workdir.
3. For each cache ∈ {none (the baseline), prefix, dual} × rule ∈ {fixed steps =
   gen_length, threshold 0.9, factor 1}: exact-match accuracy on --num_test
   held-out lists (left-padded batches of 8), NFE per generated token (model
   calls / gen_length), and tokens/s (batch × gen_length / wall seconds, min /
   median / max of --repeats after the compiling call) at batch 1 and 8; gen_length 256, block 32.
   Also dual + threshold + stop_at_eos. JSON to stdout (and --output).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from configs import tiny
import llada_jax
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.frontends import settings as frontend
from llada_jax.training import train as train_lib

FLAGS = flags.FLAGS
GEN_LENGTH, BLOCK_LENGTH = 256, 32
MODES = [dict(cache=c, **rule) for c in ("none", "prefix", "dual")
         for rule in ({"steps": GEN_LENGTH}, {"threshold": 0.9}, {"factor": 1.0})]
MODES.append(dict(cache="dual", threshold=0.9, stop_at_eos=True))


def _define_flags():
  flags.DEFINE_string("workdir", "runs/fast_sampling", "Data, tokenizer and training runs.")
  flags.DEFINE_integer("stage1_steps", 1500, "Training steps on short rows.")
  flags.DEFINE_integer("stage2_steps", 200, "Fine-tuning steps on prompt + 256 rows.")
  flags.DEFINE_integer("num_test", 200, "Held-out lists scored per setting.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per setting and batch after a warm-up.")
  flags.DEFINE_bool("skip_train", False, "Use the trained model already in --workdir.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def is_test(digits: str) -> bool:
  return int(hashlib.md5(digits.encode()).hexdigest(), 16) % 10 == 0


def task_paths(out_dir: str) -> dict[str, str]:
  """{"train", "test": JSONL, "tokenizer": dir} of the task `make_task` writes in out_dir."""
  return {"train": os.path.join(out_dir, "train.jsonl"),
          "test": os.path.join(out_dir, "test.jsonl"),
          "tokenizer": os.path.join(out_dir, "tokenizer")}


def make_task(out_dir: str, num_train: int = 200_000, num_test: int = 1000, seed: int = 0,
              lengths: tuple[int, int] = (6, 10)) -> dict[str, str]:
  """Writes train/test JSONL ({"prompt", "response"}: sort `lengths[0]`…`lengths[1]`
  digits) and a SentencePiece tokenizer."""
  paths = task_paths(out_dir)
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  os.makedirs(out_dir, exist_ok=True)
  rng = random.Random(seed)
  split = {"train": [], "test": []}
  while len(split["train"]) < num_train or len(split["test"]) < num_test:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(*lengths)))
    split["test" if is_test(digits) else "train"].append(
        {"prompt": digits, "response": "".join(sorted(digits))})
  corpus = os.path.join(out_dir, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("user\nassistant\n")
    for rec in split["train"][:20_000]:
      f.write(f"{rec['prompt']}\n{rec['response']}\n")
  tokenizer_lib.train([corpus], 300, paths["tokenizer"])
  for name, limit in (("train", num_train), ("test", num_test)):
    with open(paths[name], "w") as f:
      for rec in split[name][:limit]:
        f.write(json.dumps(rec) + "\n")
  return paths


def train_config(paths, *, seq_len: int, steps: int, batch_size: int, lr: float,
                 init_from: str = ""):
  cfg = tiny.get_config()
  cfg.model.vocab_size = cfg.model.embedding_size = 300
  cfg.model.max_sequence_length = 320
  cfg.kind, cfg.seq_len, cfg.total_steps, cfg.batch_size = "sft", seq_len, steps, batch_size
  cfg.init_from = init_from
  cfg.data.source, cfg.data.eval_source = paths["train"], paths["test"]
  cfg.tokenizer.path = paths["tokenizer"]
  opt = cfg.optimizer
  opt.learning_rate, opt.warmup_steps = lr, min(100, steps // 10)
  opt.decay_steps, opt.final_learning_rate = steps // 4, lr / 10
  cfg.eval_every, cfg.eval_batches, cfg.checkpoint.every_steps = steps, 4, 500
  cfg.samples.num = 0
  return cfg


def prompt_ids(tok, records) -> list[list[int]]:
  return [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in records]


def run_mode(model, tok, records, mode: dict, repeats: int) -> dict:
  args = dict(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, **mode)
  ids = prompt_ids(tok, records)
  correct, nfe_sum, batches = 0, 0, 0
  for start in range(0, len(ids), 8):
    rows = ids[start:start + 8]
    width = max(map(len, rows))
    x, mask = frontend.left_pad(rows, width, tok.pad_id, num_rows=8)
    out, nfe = llada_jax.generate(model, x, mask, return_nfe=True, **args)
    out = np.asarray(out)
    for r, rec in enumerate(records[start:start + 8]):
      correct += tok.decode(out[r, width:].tolist()).strip() == rec["response"]
    nfe_sum, batches = nfe_sum + nfe, batches + 1
  result = {"mode": mode, "accuracy": correct / len(records),
            "nfe_per_token": nfe_sum / batches / GEN_LENGTH}
  for batch in (1, 8):
    rows = ids[:batch]
    width = max(map(len, rows))
    x, mask = frontend.left_pad(rows, width, tok.pad_id)
    start = time.perf_counter()
    jax.block_until_ready(llada_jax.generate(model, x, mask, **args))
    compile_s = time.perf_counter() - start
    seconds = common.time_call(lambda: llada_jax.generate(model, x, mask, **args), repeats,
                               warmup=0)
    result[f"batch{batch}"] = {"seconds": seconds,
                               "tokens_per_s": common.per_second(batch * GEN_LENGTH, seconds),
                               "first_call_seconds": compile_s}
  print(json.dumps(result), flush=True)
  return result


def add_ratios(results: list[dict]) -> list[dict]:
  """Each `run_mode` result with its speed-ups (median tokens/s at batch 1 and 8) and
  accuracy change in points, both against the first (the baseline setting)."""
  base = results[0]
  for r in results:
    for batch in (1, 8):
      r[f"speedup_batch{batch}"] = (r[f"batch{batch}"]["tokens_per_s"]["median"]
                                    / base[f"batch{batch}"]["tokens_per_s"]["median"])
    r["accuracy_change_points"] = 100 * (r["accuracy"] - base["accuracy"])
  return results


def run(workdir: str, *, stage1_steps: int, stage2_steps: int, num_test: int, repeats: int,
        skip_train: bool) -> dict:
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  machine = common.machine()  # the load average before any work
  paths = make_task(os.path.join(workdir, "task"))
  tok = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  stage1, stage2 = os.path.join(workdir, "stage1"), os.path.join(workdir, "stage2")
  with open(paths["test"]) as f:
    records = [json.loads(line) for line in f][:num_test]
  prompt_len = max(len(p) for p in prompt_ids(tok, records))
  train_seconds = None
  if not skip_train:
    start = time.perf_counter()
    train_lib.train_and_evaluate(
        train_config(paths, seq_len=prompt_len + 16, steps=stage1_steps, batch_size=64,
                     lr=3e-3), stage1)
    train_lib.train_and_evaluate(
        train_config(paths, seq_len=prompt_len + GEN_LENGTH, steps=stage2_steps, batch_size=16,
                     lr=1e-3, init_from=stage1), stage2)
    train_seconds = time.perf_counter() - start
  model = llada_jax.load(stage2)
  results = add_ratios([run_mode(model, tok, records, mode, repeats) for mode in MODES])
  return {"task": "sort 6-10 digits", "gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH,
          "num_test": len(records), "train_seconds": train_seconds,
          "stage1_steps": stage1_steps, "stage2_steps": stage2_steps,
          "params": model.config.num_params(), "machine": machine, "results": results}


def main(argv):
  del argv
  common.write_json(run(FLAGS.workdir, stage1_steps=FLAGS.stage1_steps,
                        stage2_steps=FLAGS.stage2_steps, num_test=FLAGS.num_test,
                        repeats=FLAGS.repeats, skip_train=FLAGS.skip_train), FLAGS.output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
