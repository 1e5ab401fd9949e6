"""Training-loop steps/s of an older commit's trainer next to this checkout's.

  python -m benchmarks.train_before_after [--ref fc99e7f^] [--configs tiny,100M]
      [--repeats 1] [--output out/train_before_after.json]

`--ref` is extracted (`git archive`) into a temporary directory; each tree then
runs its own `python -m llada_jax.train --config configs/tiny.py` in a
subprocess (PYTHONPATH and cwd that tree), with `--config.*` overrides that
both trainers know: the shapes of `benchmarks/train.py`'s setups, pre-tokenized
random documents (the same file for both), no evaluation, samples or
checkpoints in between. Steps/s come from the tokens/s of each logging window
(the log lines), the first window (compilation) dropped; min/median/max over
the windows of all repeats, the runs of the two trees interleaved. The load
average is recorded (benchmarks/common.py): the CPU may be shared.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common
from benchmarks import train as train_bench
from llada_jax.training import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (model overrides, batch, seq_len, logging windows, steps per window)
SETUPS = {"tiny": ({}, 16, 128, 5, 20), "100M": (train_bench.MODEL_100M, 8, 256, 3, 1)}


def extract(ref: str, directory: str) -> str:
  """The tree of commit `ref` of this repository, written under `directory`."""
  try:
    archive = subprocess.run(["git", "-C", REPO, "archive", ref], check=True,
                             capture_output=True).stdout
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"--ref {ref!r}: git archive failed: {e.stderr.decode().strip()}")
  os.makedirs(directory)
  subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
  return directory


def write_docs(path: str, vocab: int) -> str:
  """400 random pre-tokenized documents (ids >= 7: past the special ids)."""
  rs = np.random.RandomState(0)
  data_lib.write_token_records(path, [rs.randint(7, vocab, rs.randint(20, 400))
                                      for _ in range(400)])
  return path


def overrides(setup: str, source: str) -> list[str]:
  """`--config.*` flags both trainers accept for `setup` on the documents in `source`."""
  model, batch, seq_len, windows, window_steps = SETUPS[setup]
  values = {"batch_size": batch, "seq_len": seq_len, "total_steps": (windows + 1) * window_steps,
            "log_every": window_steps, "eval_every": 0, "eval_batches": 1,
            "eval_batch_size": batch, "eval_samples": 1, "peak_flops": 1e12,
            "data.source": source, "optimizer.warmup_steps": 2, "optimizer.decay_steps": 0,
            "tokenizer.train_vocab_size": 0, "samples.num": 0,
            "checkpoint.every_steps": 10 ** 6,
            **{f"model.{k}": v for k, v in model.items()}}
  return [f"--config.{k}={v}" for k, v in values.items()]


def run_loop(tree: str, setup: str, source: str, workdir: str) -> dict:
  """One run of `tree`'s trainer -> steps/s per window (first dropped) and wall seconds."""
  env = {**os.environ, "PYTHONPATH": tree}
  where = subprocess.run([sys.executable, "-c", "import llada_jax; print(llada_jax.__file__)"],
                         cwd=tree, env=env, check=True, capture_output=True, text=True).stdout
  if not os.path.realpath(where.strip()).startswith(os.path.realpath(tree) + os.sep):
    raise RuntimeError(f"{tree}: PYTHONPATH did not win, llada_jax comes from {where.strip()}")
  cmd = [sys.executable, "-m", "llada_jax.train", "--config", "configs/tiny.py",
         "--workdir", workdir, *overrides(setup, source)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  log = proc.stdout + proc.stderr
  tok_s = [float(t.replace(",", "")) for t in re.findall(r"tokens/s ([\d,]+)", log)]
  _, batch, seq_len, windows, _ = SETUPS[setup]
  if proc.returncode or len(tok_s) != windows + 1:
    raise RuntimeError(f"{tree}: `{' '.join(cmd)}` exited {proc.returncode} with "
                       f"{len(tok_s)} log lines (want {windows + 1}):\n{log[-4000:]}")
  return {"steps_per_s": [t / (batch * seq_len) for t in tok_s[1:]], "wall_s": wall}


def bench(trees: dict[str, str], setup: str, repeats: int, tmp: str) -> dict:
  """Steps/s of each tree's loop on `setup`, the runs of the trees interleaved."""
  source = write_docs(os.path.join(tmp, f"{setup}.array_record"),
                      int(SETUPS[setup][0].get("vocab_size", 2048)))
  windows = {name: [] for name in trees}
  wall = {name: [] for name in trees}
  for r in range(repeats):
    for name, tree in trees.items():
      out = run_loop(tree, setup, source, os.path.join(tmp, f"{setup}-{name}-{r}"))
      windows[name] += out["steps_per_s"]
      wall[name].append(out["wall_s"])
  result = {name: {"steps_per_s": common.stats(windows[name]), "windows": len(windows[name]),
                   "run_wall_s": wall[name]} for name in trees}
  _, batch, seq_len, _, window_steps = SETUPS[setup]
  result.update(config=setup, batch_size=batch, seq_len=seq_len, steps_per_window=window_steps,
                speedup=result["after"]["steps_per_s"]["median"]
                / result["before"]["steps_per_s"]["median"])
  return result


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ref", default="fc99e7f^", help="the 'before' commit")
  ap.add_argument("--configs", default="tiny,100M")
  ap.add_argument("--repeats", type=int, default=1, help="runs per tree and config")
  ap.add_argument("--output", default="")
  args = ap.parse_args()
  setups = args.configs.split(",")
  if unknown := [s for s in setups if s not in SETUPS]:
    ap.error(f"--configs: unknown {unknown} (known: {sorted(SETUPS)})")
  if args.repeats < 1:
    ap.error(f"--repeats={args.repeats}: want at least 1")
  machine = common.machine()
  with tempfile.TemporaryDirectory() as tmp:
    trees = {"before": extract(args.ref, os.path.join(tmp, "before")), "after": REPO}
    runs = [bench(trees, setup, args.repeats, tmp) for setup in setups]
  common.write_json({"benchmark": "train_before_after", "machine": machine, "ref": args.ref,
                     "ref_commit": subprocess.run(["git", "-C", REPO, "rev-parse", args.ref],
                                                  capture_output=True, text=True).stdout.strip(),
                     "after": "this checkout (working tree)", "runs": runs}, args.output)


if __name__ == "__main__":
  main()
