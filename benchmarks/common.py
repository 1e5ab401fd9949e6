"""Shared benchmark helpers: timing and this machine's matmul peak."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def call_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `repeats` calls of `fn()` (its result blocked on), after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (its result blocked on), after `warmup` calls."""
  return sorted(call_times(fn, repeats, warmup))[repeats // 2]


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a jitted n×n float32 matmul: the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.dot)
  return 2.0 * n ** 3 / time_call(lambda: matmul(a, b), repeats)


def machine() -> dict[str, Any]:
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "jax": jax.__version__}


def write_json(result: dict[str, Any], path: str | None) -> None:
  text = json.dumps(result, indent=2)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")
  print(text)
