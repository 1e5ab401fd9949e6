"""lm-eval request throughput of `llada_jax.evaluate`, with and without length buckets.

  python -m benchmarks.evaluate [--checkpoint tests/fixtures/llada_tiny] [--requests 64]
      [--batch_size 8] [--mc_num 16] [--mc_batch_size 8] [--gen_length 16] [--output out.json]

Builds `loglikelihood` requests (contexts of 8-200 tokens, continuations of 1-8,
from Python's bundled documentation) and `generate_until` requests, scores
them through the lm-eval model as the harness would, and reports requests/s
(the first call, compiles included, then min / median / max of --repeats
warm calls) and the number of programs compiled, once with the front ends' length and row
buckets (model arg padding=bucket) and once padding each batch only to its
longest request (padding=longest). JSON output.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from lm_eval.api.instance import Instance
from pydoc_data import topics

from benchmarks import common
from llada_jax.frontends import evaluate
from llada_jax.sampling import likelihood
from llada_jax.sampling import sampler as sampling


def make_requests(tok, n: int, seed: int = 0):
  """(loglikelihood args, generate_until args): n of each, varied lengths."""
  words = " ".join(topics.topics.values()).split()
  rng = np.random.default_rng(seed)
  ll, gen = [], []
  for _ in range(n):
    start = int(rng.integers(0, len(words) - 300))
    ctx = " ".join(words[start:start + int(rng.integers(6, 150))])
    cont = " " + " ".join(words[start + 150:start + 150 + int(rng.integers(1, 6))])
    ll.append((ctx, cont))
    gen.append((ctx, {"until": ["\n\n"]}))
  return ll, gen


def _timed(fn, kind, args, repeats: int) -> tuple[float, dict[str, float]]:
  """(seconds of the first call, compiles included; min / median / max of `repeats` more)."""
  requests = [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]
  start = time.perf_counter()
  fn(requests)
  first = time.perf_counter() - start
  return first, common.time_call(lambda: fn(requests), repeats, warmup=0)


def run(checkpoint: str, requests: int, batch_size: int, mc_num: int, mc_batch_size: int,
        gen_length: int, repeats: int = 3) -> dict:
  model_args = {"checkpoint": checkpoint, "batch_size": batch_size, "mc_num": mc_num,
                "mc_batch_size": mc_batch_size, "gen_length": gen_length, "steps": gen_length,
                "block_length": gen_length}
  result = {"machine": common.machine(), "checkpoint": checkpoint, "requests": requests,
            "batch_size": batch_size, "mc_num": mc_num, "mc_batch_size": mc_batch_size,
            "gen_length": gen_length, "repeats": repeats, "results": []}
  for padding in evaluate.PADDING:
    lm = evaluate.LLaDAEval(**model_args, padding=padding)
    ll, gen = make_requests(lm.tok, requests)
    likelihood._ll_loop_jit.clear_cache()  # pylint: disable=protected-access
    sampling._sample_loop_jit.clear_cache()  # pylint: disable=protected-access
    ll_first, ll_s = _timed(lm.loglikelihood, "loglikelihood", ll, repeats)
    ll_programs = likelihood._ll_loop_jit._cache_size()  # pylint: disable=protected-access
    gen_first, gen_s = _timed(lm.generate_until, "generate_until", gen, repeats)
    gen_programs = sampling._sample_loop_jit._cache_size()  # pylint: disable=protected-access
    result["results"].append({
        "padding": padding, "loglikelihood_first_call_seconds": ll_first,
        "loglikelihood_seconds": ll_s,
        "loglikelihood_requests_per_s": common.per_second(requests, ll_s),
        "loglikelihood_programs": ll_programs,
        "generate_until_first_call_seconds": gen_first, "generate_until_seconds": gen_s,
        "generate_until_requests_per_s": common.per_second(requests, gen_s),
        "generate_until_programs": gen_programs})
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="tests/fixtures/llada_tiny")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--mc_num", type=int, default=16)
  parser.add_argument("--mc_batch_size", type=int, default=8)
  parser.add_argument("--gen_length", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  parser.add_argument("--output", help="also write the JSON here")
  a = parser.parse_args(argv)
  common.write_json(run(a.checkpoint, a.requests, a.batch_size, a.mc_num, a.mc_batch_size,
                        a.gen_length, a.repeats), a.output)


if __name__ == "__main__":
  main()
