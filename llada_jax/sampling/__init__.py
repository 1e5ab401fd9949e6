"""Sampling and likelihood: `generate` (sampler), reveal rules (decoding),
KV caches (kv_cache), the Monte Carlo likelihood (likelihood)."""

from llada_jax.sampling.likelihood import log_likelihood
from llada_jax.sampling.sampler import generate

__all__ = ["generate", "log_likelihood"]
