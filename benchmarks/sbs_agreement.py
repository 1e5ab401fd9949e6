"""Token agreement with the official PyTorch generate on many prompts (no timing).

  SBS_REF_DIR=/tmp/sbsref PYTHONPATH=$PWD /tmp/sbsvenv/bin/python -m benchmarks.sbs_agreement \
      [--size tiny] [--batch 8] [--gen_length 64] [--calls 12] [--output out/agreement.json]

Runs in the side-by-side venv (torch 2.13 + the official code fetched into
$SBS_REF_DIR, as `../shared/bench/README.md` says) and imports that harness's
`make_snapshot` (same random weights as its runs, seed 0). For --calls batches
of prompts drawn from `rng([100, call])` it compares, token for token, the
official `generate` with `llada_jax.generate` (cache="none", greedy, steps =
gen_length, block 32): our default (the last layer on the block's rows only)
and the full last layer (`rows` off). A difference means a float32 tie between
candidates' confidences broke the other way.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks import common

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")


def _full_last_layer(forward_hidden):
  """`forward_hidden` that runs the whole last layer and slices the rows afterwards."""
  import jax  # pylint: disable=g-import-not-at-top

  def full(self, ids, mask=None, rows=None, segments=None):
    x_BLD = forward_hidden(self, ids, mask, segments=segments)
    return x_BLD if rows is None else jax.lax.dynamic_slice_in_dim(x_BLD, rows[0], rows[1], 1)
  return full


def run(size: str, batch: int, gen_length: int, calls: int) -> dict:
  ref_dir = os.environ.get("SBS_REF_DIR")
  if not ref_dir or not os.path.isdir(os.path.join(ref_dir, "refllada")):
    raise SystemExit("SBS_REF_DIR: set it to the folder holding refllada/ (see "
                     "../shared/bench/README.md)")
  sys.path[:0] = [os.path.abspath(BENCH), ref_dir]
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import side_by_side as sbs  # pylint: disable=g-import-not-at-top
  from refllada import generate as official  # pylint: disable=g-import-not-at-top
  import llada_jax  # pylint: disable=g-import-not-at-top
  from llada_jax.models import llada  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  snap, tmodel, _, cfg, _ = sbs.make_snapshot(size, "/tmp/sbswork", 0)
  ref, model = sbs.Wrap(tmodel), llada_jax.load(snap, dtype="float32")
  kw = dict(steps=gen_length, gen_length=gen_length, block_length=min(32, gen_length))
  rows_fh = llada.Transformer.forward_hidden
  variants = {"rows": rows_fh, "full_last_layer": _full_last_layer(rows_fh)}
  diffs = {name: [] for name in variants}
  try:
    for call in range(calls):
      p = np.random.default_rng([100, call]).integers(0, cfg["vocab_size"] - 100, (batch, 32))
      with torch.inference_mode():
        want = official.generate(ref, torch.tensor(p), None, temperature=0., cfg_scale=0.,
                                 remasking="low_confidence", mask_id=cfg["mask_token_id"],
                                 **kw).numpy()
      for name, fh in variants.items():
        llada.Transformer.forward_hidden = fh
        jax.clear_caches()
        got = np.asarray(llada_jax.generate(model, p, **kw))
        diffs[name].append(int((got[:, 32:] != want[:, 32:]).sum()))
      print(f"call {call}: differing tokens {({k: v[-1] for k, v in diffs.items()})}", flush=True)
  finally:
    llada.Transformer.forward_hidden = rows_fh
  return {"benchmark": "sbs_agreement", "size": size, "batch": batch, "gen_length": gen_length,
          "calls": calls, "compared_tokens_per_call": batch * gen_length,
          "differing_tokens": diffs, "machine": common.machine()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="tiny")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--gen_length", type=int, default=64)
  p.add_argument("--calls", type=int, default=12)
  p.add_argument("--output", default=None)
  a = p.parse_args()
  if min(a.batch, a.gen_length, a.calls) < 1:
    p.error("--batch, --gen_length and --calls must be >= 1")
  common.write_json(run(a.size, a.batch, a.gen_length, a.calls), a.output)


if __name__ == "__main__":
  main()
