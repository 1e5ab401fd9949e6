"""Model FLOPs of a training step and peak FLOP/s, for throughput and MFU.

Model FLOPs per trained token = 3 x `ModelConfig.forward_flops_per_token`
(forward + backward, the backward costing two forwards).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from llada_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (public spec sheets), by `device_kind` prefix.
TPU_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
  return 3.0 * cfg.forward_flops_per_token(seq_len)


def matmul_peak_flops(sizes: tuple[int, ...] = (1024, 2048), dtype=jnp.float32,
                      repeats: int = 5, device=None) -> float:
  """This device's practical peak: the best FLOP/s of jitted n x n x n matmuls of
  random `dtype` operands, over `sizes` and `repeats` timed calls each (after a
  warm-up). Benchmarks and the trainer's MFU both use it."""
  device = device or jax.devices()[0]
  f = jax.jit(jnp.matmul)
  best = 0.0
  for n in sizes:
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), dtype), device)
            for i in range(2))
    f(a, b).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
  return best


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s, how it was found): spec sheet for TPUs, else a measured matmul."""
  device = device or jax.devices()[0]
  for prefix, peak in sorted(TPU_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if device.device_kind.startswith(prefix):
      return peak, f"{device.device_kind} spec sheet (bf16)"
  return matmul_peak_flops(device=device), f"measured float32 matmul on {device.device_kind}"
