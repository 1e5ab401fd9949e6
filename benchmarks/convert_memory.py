"""Peak memory of checkpoint conversion on a synthetic LLaDA-shaped checkpoint.

    python -m benchmarks.convert_memory [--output results.json] [--workdir DIR]

Writes a random bf16 safetensors snapshot (default 2.1 GB: d_model 2048, 8
layers, MLP 8192, LLaDA's 126,464-token vocabulary), converts it HF -> Orbax
and back in child processes, and reports each child's peak RSS (from
`os.wait4`) against the checkpoint size and the largest stacked tensor. The
synthetic files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from benchmarks import common
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.config import ModelConfig
from llada_jax.convert import staging
from llada_jax.models.llada import param_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_synthetic_snapshot(cfg: ModelConfig, out_dir: str, max_shard_size: str) -> int:
  """Random N(0, 0.02) bf16 weights in HF layout, streamed shard by shard; returns bytes."""
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf(torch_dtype="bfloat16"), f, indent=2)
  shapes = hf_checkpoint.expected_hf_shapes(cfg)
  writer = hf_checkpoint.SafetensorsShardWriter(out_dir, shapes, "bfloat16", max_shard_size)
  rng = np.random.default_rng(0)
  for name, shape in shapes.items():
    w = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    writer.write(name, w)
    del w
  files = writer.close()
  return sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)


def run_child(args: list[str], poll_s: float = 0.01) -> dict:
  """Runs `python ARGS` from the repo root; its seconds and peak RSS.

  The peak is the child's VmHWM (/proc), polled until it exits: a high-water
  mark, so only growth in the last `poll_s` could be missed. (getrusage's
  ru_maxrss of a child starts at this process's RSS at fork, so it is not used.)
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env)
  peak = 0
  while proc.poll() is None:
    peak = max(peak, staging.peak_rss_bytes(proc.pid))
    time.sleep(poll_s)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(args)} failed with exit status {proc.returncode}")
  return {"seconds": round(seconds, 2), "peak_rss_bytes": peak}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", default=None, help="JSON result file")
  parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--n_layers", type=int, default=8)
  parser.add_argument("--mlp_hidden_size", type=int, default=8192)
  parser.add_argument("--vocab_size", type=int, default=126464)
  parser.add_argument("--max_shard_size", default="1GB")
  args = parser.parse_args(argv)
  cfg = ModelConfig(d_model=args.d_model, n_heads=args.d_model // 128,
                    n_kv_heads=args.d_model // 128, n_layers=args.n_layers,
                    mlp_hidden_size=args.mlp_hidden_size, vocab_size=args.vocab_size,
                    embedding_size=args.vocab_size, param_dtype="bfloat16")
  largest = max(math.prod(s) for s in param_shapes(cfg).values()) * 2
  scratch = tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir)
  try:
    hf_dir, orbax_dir, back_dir = (os.path.join(scratch, n) for n in ("hf", "orbax", "hf_back"))
    print(f"writing a {cfg.num_params():,}-parameter synthetic snapshot to {hf_dir}",
          file=sys.stderr)
    ckpt_bytes = write_synthetic_snapshot(cfg, hf_dir, args.max_shard_size)
    baseline = run_child(["-c", "import convert.hf_to_orbax, convert.orbax_to_hf"])
    runs = {
        "hf_to_orbax": run_child(["-m", "llada_jax.convert.hf_to_orbax", "--hf_dir", hf_dir,
                                  "--output_dir", orbax_dir, "--no_progress"]),
        "orbax_to_hf": run_child(["-m", "llada_jax.convert.orbax_to_hf", "--checkpoint", orbax_dir,
                                  "--output_dir", back_dir, "--max_shard_size",
                                  args.max_shard_size, "--no_progress"]),
    }
    for run in runs.values():
      run["ratio"] = round(run["peak_rss_bytes"] / ckpt_bytes, 3)
      run["peak_rss_over_largest_tensor"] = round(
          (run["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / largest, 2)
    worst = max(runs.values(), key=lambda r: r["peak_rss_bytes"])
    result = {
        "benchmark": "convert_memory",
        "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers,
                   "mlp_hidden_size": cfg.mlp_hidden_size, "vocab_size": cfg.vocab_size,
                   "params": cfg.num_params(), "dtype": "bfloat16"},
        "checkpoint_bytes": ckpt_bytes,
        "largest_stacked_tensor_bytes": largest,
        "peak_rss_bytes": worst["peak_rss_bytes"],
        "ratio": worst["ratio"],
        "seconds": round(sum(r["seconds"] for r in runs.values()), 2),
        "import_baseline_rss_bytes": baseline["peak_rss_bytes"],
        "runs": runs,
        "limit_bytes_1.25x_plus_1GB": int(1.25 * ckpt_bytes + 2**30),
        "machine": common.machine(),
    }
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  common.write_json(result, args.output)


if __name__ == "__main__":
  main()
