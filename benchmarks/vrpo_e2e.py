"""End to end: SFT a tiny model on a synthetic task, then VRPO on its own mistakes.

  python -m benchmarks.vrpo_e2e --workdir runs/vrpo_e2e [--sft_steps 300] [--vrpo_steps 80]
      [--num_test 64] [--output out/vrpo_e2e.json]

1. Task: sort a list of 4–6 digits ("5132" -> "1235"); a list is held out when
   the MD5 of its text is 0 mod 10 (`benchmarks.fast_sampling.is_test`), so no
   test list is trained on. A 300-token SentencePiece tokenizer is trained on
   the training lists.
2. SFT with the project's trainer (`kind="sft"`, configs/tiny.py shapes) for
   --sft_steps: a model that is right on some lists, wrong on others.
3. Pairs: the SFT model answers training prompts with `generate` (greedy);
   chosen = the correct sorted list, rejected = its answer where it is wrong,
   else the correct list with two different digits swapped.
4. VRPO with the trainer (`kind="vrpo"`, init_from = reference = the SFT
   workdir; n = 4, optimal allocation, antithetic) for --vrpo_steps.
5. Held out (the same pairs, made the same way from test prompts, and the same
   seeds for both models): preference accuracy = the fraction of pairs whose
   chosen answer has the higher `log_likelihood` (mc_num 32); task accuracy =
   exact match of `generate` (greedy, gen_length 8). JSON to stdout.

A finished SFT stage (`WORKDIR/sft_<steps>`) is reused, so a
sweep over β, lr and --vrpo_steps pays only for VRPO and the evaluation; each
setting trains in its own `WORKDIR/vrpo_sft<steps>_s<steps>_b<β>_lr<lr>_p<pairs>`.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from benchmarks import fast_sampling
import llada_jax
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.checkpoints import layout
from llada_jax.frontends import settings as frontend
from llada_jax.training import train as train_lib

GEN_LENGTH = 8
SEQ_LEN = 40


def _define_flags():
  flags.DEFINE_string("workdir", "runs/vrpo_e2e", "Data, tokenizer and training runs.")
  flags.DEFINE_integer("sft_steps", 300, "SFT steps (batch 64).")
  flags.DEFINE_integer("vrpo_steps", 80, "VRPO steps (batch 16 pairs).")
  flags.DEFINE_integer("num_pairs", 256, "Training preference pairs made from SFT answers.")
  flags.DEFINE_integer("num_test", 64, "Held-out prompts.")
  flags.DEFINE_float("beta", 0.1, "VRPO's β (DPO's usual 0.1).")
  flags.DEFINE_float("lr", 1e-5, "VRPO learning rate (constant after warm-up).")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def make_task(out_dir: str) -> dict[str, str]:
  """fast_sampling's sorting task with 4–6 digits (train/test JSONL and a tokenizer)."""
  return fast_sampling.make_task(out_dir, num_train=20_000, num_test=500, lengths=(4, 6))


def answers(model, tok, records) -> list[str]:
  """Greedy `generate` answers (batches of 16, left-padded)."""
  ids = fast_sampling.prompt_ids(tok, records)
  out = []
  for start in range(0, len(ids), 16):
    rows = ids[start:start + 16]
    width = max(map(len, rows))
    x, mask = frontend.left_pad(rows, width, tok.pad_id, num_rows=16)
    gen = np.asarray(llada_jax.generate(model, x, mask, gen_length=GEN_LENGTH,
                                        steps=GEN_LENGTH, block_length=GEN_LENGTH))
    out += [tok.decode(gen[r, width:].tolist()).strip() for r in range(len(rows))]
  return out


def make_pairs(records, generated, seed: int) -> list[dict]:
  """chosen = the right answer; rejected = the model's wrong one, else a two-digit swap."""
  rng = random.Random(seed)
  pairs = []
  for rec, got in zip(records, generated):
    right = rec["response"]
    wrong = got
    if got == right or not got:
      digits = list(right)
      choices = [(i, j) for i in range(len(digits)) for j in range(i + 1, len(digits))
                 if digits[i] != digits[j]]
      if not choices:
        continue
      i, j = rng.choice(choices)
      digits[i], digits[j] = digits[j], digits[i]
      wrong = "".join(digits)
    pairs.append({"prompt": rec["prompt"], "chosen": right, "rejected": wrong})
  return pairs


def preference_accuracy(model, tok, pairs) -> float:
  """Fraction of pairs whose chosen answer has the higher ELBO estimate (fixed seeds)."""
  prompts = fast_sampling.prompt_ids(tok, pairs)
  scores = {}
  for key in ("chosen", "rejected"):
    ans = [tok.encode(p[key]) + [tok.eot_id] for p in pairs]
    scores[key] = llada_jax.log_likelihood(model, prompts, ans, mc_num=32, batch_size=32,
                                           rng=0, pad_to=SEQ_LEN)
  return float(np.mean(scores["chosen"] > scores["rejected"]))


def task_accuracy(model, tok, records) -> float:
  got = answers(model, tok, records)
  return float(np.mean([g == r["response"] for g, r in zip(got, records)]))


def vrpo_config(sft_dir: str, source: str, eval_source: str, steps: int, beta: float,
                lr: float):
  cfg = fast_sampling.train_config({"train": source, "test": eval_source, "tokenizer": ""},
                                   seq_len=SEQ_LEN, steps=steps, batch_size=16, lr=lr,
                                   init_from=sft_dir)
  cfg.kind = "vrpo"
  cfg.tokenizer.path = ""  # init_from's
  cfg.vrpo.update(n_samples=4, allocation="optimal", antithetic=True, beta=beta)
  cfg.optimizer.update(warmup_steps=min(10, steps // 5), decay_steps=0, final_learning_rate=lr,
                       weight_decay=0.0)
  cfg.eval_batch_size, cfg.eval_batches = 16, 2
  cfg.log_every = 10
  return cfg


def finished_step(run_dir: str) -> int:
  """The newest finished checkpoint step of a training workdir (0 if none)."""
  steps = layout.step_dirs(os.path.join(run_dir, layout.CHECKPOINTS_DIR))
  return int(os.path.basename(steps[0])) if steps else 0


def run(workdir: str, *, sft_steps: int, vrpo_steps: int, num_pairs: int, num_test: int,
        beta: float, lr: float) -> dict:
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  paths = make_task(os.path.join(workdir, "task"))
  tok = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  sft_dir = os.path.join(workdir, f"sft_{sft_steps}")
  vrpo_dir = os.path.join(workdir, f"vrpo_sft{sft_steps}_s{vrpo_steps}_b{beta:g}_lr{lr:g}"
                          f"_p{num_pairs}")
  timings = {}
  if finished_step(sft_dir) < sft_steps:  # else reuse the finished SFT stage
    start = time.perf_counter()
    train_lib.train_and_evaluate(fast_sampling.train_config(
        paths, seq_len=SEQ_LEN, steps=sft_steps, batch_size=64, lr=3e-3), sft_dir)
    timings["sft_seconds"] = time.perf_counter() - start
  sft = llada_jax.load(sft_dir)
  read = lambda p, n: [json.loads(line) for line in open(p)][:n]
  train_recs, test_recs = read(paths["train"], num_pairs), read(paths["test"], num_test)
  start = time.perf_counter()
  pair_files = {}
  for name, recs, seed in (("train", train_recs, 1), ("test", test_recs, 2)):
    pair_files[name] = os.path.join(workdir, f"pairs_sft{sft_steps}_{name}_{len(recs)}.jsonl")
    pairs = make_pairs(recs, answers(sft, tok, recs), seed)
    with open(pair_files[name], "w") as f:
      f.write("".join(json.dumps(p) + "\n" for p in pairs))
  timings["pairs_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  train_lib.train_and_evaluate(vrpo_config(sft_dir, pair_files["train"], pair_files["test"],
                                           vrpo_steps, beta, lr), vrpo_dir)
  timings["vrpo_seconds"] = time.perf_counter() - start
  tuned = llada_jax.load(vrpo_dir)
  test_pairs = [json.loads(line) for line in open(pair_files["test"])]
  result = {"task": "sort 4-6 digits", "sft_steps": sft_steps, "vrpo_steps": vrpo_steps,
            "beta": beta, "lr": lr, "train_pairs": len(train_recs),
            "test_pairs": len(test_pairs), "test_prompts": len(test_recs)}
  for name, model in (("sft", sft), ("vrpo", tuned)):
    result[name] = {"preference_accuracy": preference_accuracy(model, tok, test_pairs),
                    "task_accuracy": task_accuracy(model, tok, test_recs)}
  result["preference_accuracy_gain_points"] = 100 * (result["vrpo"]["preference_accuracy"]
                                                     - result["sft"]["preference_accuracy"])
  result["task_accuracy_change_points"] = 100 * (result["vrpo"]["task_accuracy"]
                                                 - result["sft"]["task_accuracy"])
  result.update(timings, load_average=os.getloadavg(), machine=common.machine())
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  common.write_json(run(f.workdir, sft_steps=f.sft_steps, vrpo_steps=f.vrpo_steps,
                        num_pairs=f.num_pairs, num_test=f.num_test, beta=f.beta, lr=f.lr),
                    f.output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
