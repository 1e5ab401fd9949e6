"""Sampling and likelihood: `generate` / `generate_stream` (sampler), the compiled
loop (loop), its settings and their checks (settings), reveal rules (decoding),
KV caches (kv_cache), the Monte Carlo likelihood (likelihood), shared helpers (common)."""

from llada_jax.sampling.likelihood import log_likelihood
from llada_jax.sampling.sampler import generate, generate_stream

__all__ = ["generate", "generate_stream", "log_likelihood"]
