"""MoE layer throughput: dropless grouped experts vs the dense one-hot path (not a test).

  python -m benchmarks.moe [--tokens 2048 --d_model 256 --hidden 128 --experts 8,16,64
      --k 2,8 --impls tiled,dense --backward] [--output out/moe.json]

Times the jitted `moe_layer` (router, top-k, experts, losses) in float32 on one
device for every (impl, experts, k): min / median / max wall seconds and median
process CPU seconds of `--repeats` calls after a warm-up call (the cases take
turns), tokens/s, the load average before and after, and per impl and k the cost
of the most experts relative to the fewest.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from llada_jax.layers import moe



def _interleaved_seconds(fns: Sequence[Callable[[], object]], repeats: int
                         ) -> list[tuple[list[float], list[float]]]:
  """(wall, process CPU) seconds of `repeats` calls of each fn, after one warm-up
  call each. The cases take turns, so a change in the machine's load hits them
  all alike; CPU seconds (all threads) vary less than wall time on a shared CPU."""
  for fn in fns:
    jax.block_until_ready(fn())
  times = [([], []) for _ in fns]
  for _ in range(repeats):
    for fn, (wall, cpu) in zip(fns, times):
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      wall.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  return times


def _layer_fn(cfg: moe.MoEConfig, backward: bool):
  def forward(p, x):
    y, aux = moe.moe_layer(x, p, cfg)
    return jnp.mean(y ** 2) + 0.01 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss
  if backward:
    return jax.jit(jax.grad(forward, argnums=(0, 1)))
  return jax.jit(lambda p, x: moe.moe_layer(x, p, cfg))


def _params(E: int, D: int, F: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  normal = lambda fan_in, *shape: (fan_in ** -0.5 * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
  return {"router": normal(D, D, E), "expert_bias": np.zeros((E,), np.float32),
          "gate_proj": normal(D, E, D, F), "up_proj": normal(D, E, D, F),
          "down_proj": normal(F, E, F, D)}


def run(tokens: int, d_model: int, hidden: int, experts: Sequence[int], ks: Sequence[int],
        impls: Sequence[str], backward: bool = False, repeats: int = 7) -> dict:
  x = np.random.default_rng(1).normal(size=(tokens, d_model)).astype(np.float32)
  machine = common.machine()  # the load average before any work
  load_before = os.getloadavg()
  cases = [(impl, E, k) for k in ks for E in experts for impl in impls]
  params = {E: _params(E, d_model, hidden) for E in experts}
  fns = [functools.partial(_layer_fn(moe.MoEConfig(num_experts=E, k=k, impl=impl), backward),
                           params[E], x) for impl, E, k in cases]
  results = []
  for (impl, E, k), (wall, cpu) in zip(cases, _interleaved_seconds(fns, repeats)):
    tiling = moe.resolve_tiling(tokens * k, E) if impl == "tiled" else (None, None)
    results.append({
        "impl": impl, "experts": E, "k": k, "tile": tiling[0], "tiles_per_step": tiling[1],
        "seconds_min": min(wall), "seconds_median": statistics.median(wall),
        "seconds_max": max(wall), "cpu_seconds_median": statistics.median(cpu),
        "tokens_per_s": tokens / statistics.median(wall)})
  ratios = {}
  for k in ks:
    for impl in impls:
      rows = {r["experts"]: r for r in results if r["k"] == k and r["impl"] == impl}
      lo, hi = rows[min(experts)], rows[max(experts)]
      ratios[f"k={k} {impl} E={max(experts)}/E={min(experts)}"] = {
          key: hi[key] / lo[key]
          for key in ("seconds_min", "seconds_median", "cpu_seconds_median")}
  return {"benchmark": "moe", "machine": machine,
          "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg(),
          "tokens": tokens, "d_model": d_model, "hidden": hidden, "dtype": "float32",
          "pass": "forward+backward" if backward else "forward", "repeats": repeats,
          "results": results, "cost_ratio_most_vs_fewest_experts": ratios}


def define_flags() -> None:
  """The command line (defined only when run as a script: other benchmarks share names)."""
  flags.DEFINE_integer("tokens", 2048, "Tokens per call (batch x length).")
  flags.DEFINE_integer("d_model", 256, "Model width D.")
  flags.DEFINE_integer("hidden", 128, "Expert hidden size F.")
  flags.DEFINE_list("experts", ["8", "16", "64"], "Expert counts E.")
  flags.DEFINE_list("k", ["2", "8"], "Experts per token.")
  flags.DEFINE_list("impls", ["tiled", "dense"], f"Expert paths, of {moe.IMPLS[1:]}.")
  flags.DEFINE_bool("backward", False, "Time forward + backward instead.")
  flags.DEFINE_integer("repeats", 7, "Timed calls per case.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def main(argv):
  del argv
  f = flags.FLAGS
  result = run(f.tokens, f.d_model, f.hidden, [int(e) for e in f.experts], [int(k) for k in f.k],
               f.impls, f.backward, f.repeats)
  common.write_json(result, f.output)
  print(f"MoE layer {result['pass']}, {result['tokens']} tokens, D={result['d_model']}, "
        f"F={result['hidden']}, load average {result['load_average_1_5_15_before'][0]:.1f}")
  print(f"{'impl':>10} {'E':>4} {'k':>3} {'tile':>5} {'min ms':>9} {'median ms':>10} "
        f"{'max ms':>9} {'cpu med ms':>11} {'tokens/s':>11}")
  for r in result["results"]:
    print(f"{r['impl']:>10} {r['experts']:>4} {r['k']:>3} {str(r['tile'] or '-'):>5} "
          f"{1e3 * r['seconds_min']:9.1f} {1e3 * r['seconds_median']:10.1f} "
          f"{1e3 * r['seconds_max']:9.1f} {1e3 * r['cpu_seconds_median']:11.1f} "
          f"{r['tokens_per_s']:11,.0f}")
  for name, ratio in result["cost_ratio_most_vs_fewest_experts"].items():
    print(f"{name}: {ratio['seconds_min']:.2f}x (wall min), {ratio['seconds_median']:.2f}x "
          f"(wall median), {ratio['cpu_seconds_median']:.2f}x (CPU median)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
