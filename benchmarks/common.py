"""The benchmark protocol every script in benchmarks/ follows, and shared helpers.

Protocol: warm-up call(s) (compiling) first, then several timed repeats,
reported as min / median / max (`time_call`, `stats`); `machine()` records the
load average when the run starts and warns when other jobs share the CPU,
`write_json` adds the load average at the end. Timings taken on a busy machine
are indicative only: compare the numbers of one run, or rerun quietly.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax

# A 1-minute load average above this fraction of the cores counts as busy.
BUSY_LOAD_PER_CPU = 0.25


def times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `repeats` calls of `fn()` (its result blocked on), after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - start)
  return out


def stats(values: Sequence[float]) -> dict[str, float]:
  """{"min", "median", "max"} of `values`."""
  return {"min": float(min(values)), "median": float(statistics.median(values)),
          "max": float(max(values))}


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
  """min / median / max wall seconds of `fn()` over `repeats` calls after `warmup`."""
  return stats(times(fn, repeats, warmup))


def per_second(amount: float, seconds: dict[str, float]) -> dict[str, float]:
  """A rate's min / median / max from the seconds' (the fastest call gives the max)."""
  return {"min": amount / seconds["max"], "median": amount / seconds["median"],
          "max": amount / seconds["min"]}


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def busy() -> bool:
  """Whether the 1-minute load average says other jobs share the CPU."""
  return os.getloadavg()[0] > BUSY_LOAD_PER_CPU * (os.cpu_count() or 1)


def cpu_model() -> str:
  """The CPU's model name (`/proc/cpuinfo`, else `platform.processor()`)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine() -> dict[str, Any]:
  """What ran the benchmark, with the load average at the start (warns when busy)."""
  if busy():
    print(f"warning: load average {load_average()} on {os.cpu_count()} CPUs: other jobs "
          f"share the machine; timings are indicative only", file=sys.stderr, flush=True)
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
          "jax": jax.__version__, "load_average_start": load_average(), "busy": busy()}


def report(result: dict[str, Any], path: str | None, row_line: Callable[[dict], str]) -> None:
  """`write_json(result, path)`, then one line `row_line(row)` per row of result["results"]."""
  write_json(result, path)
  for row in result["results"]:
    print(row_line(row))


def write_json(result: dict[str, Any], path: str | None) -> None:
  """Prints `result` (plus the load average now) as JSON and writes it to `path`."""
  result = {**result, "load_average_end": load_average()}
  text = json.dumps(result, indent=2)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")
  print(text)
