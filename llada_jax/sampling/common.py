"""What `generate` and `log_likelihood` share: argument checks, PRNG keys, batch
placement on the mesh, and unsupervised classifier-free guidance (SPEC §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from llada_jax import sharding


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")
  return int(value)


def check_ids(name: str, ids: np.ndarray, embedding_size: int) -> None:
  """ValueError naming `name` if any id lies outside [0, embedding_size)."""
  if ids.size and (ids.min() < 0 or ids.max() >= embedding_size):
    bad = ids[(ids < 0) | (ids >= embedding_size)].ravel()[0]
    raise ValueError(f"{name}: token id {bad} is outside [0, embedding_size={embedding_size})")


def as_key(rng) -> jax.Array:
  """A PRNG key from a key, an int seed or None (a fixed default key)."""
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


def place_batch(model, x: np.ndarray | None) -> jax.Array | None:
  """Puts a host [B, ...] array on device; split over the data axes if the model has a mesh."""
  if x is None:
    return None
  if getattr(model, "mesh", None) is None:
    return jnp.asarray(x)
  names = ("batch",) + (None,) * (x.ndim - 1)
  spec = sharding.logical_to_spec(names, model.rules, model.mesh, x.shape, warn=False)
  return jax.device_put(x, NamedSharding(model.mesh, spec))


def guidance_batch(model, x_BL: jax.Array, prompt_BL: jax.Array) -> jax.Array:
  """[2B, L]: x, then x with every `prompt_BL` position set to MASK."""
  return jnp.concatenate([x_BL, jnp.where(prompt_BL, model.config.mask_token_id, x_BL)])


def combine_guidance(both_BLV: jax.Array, cfg_scale: jax.Array) -> jax.Array:
  """Logits [2B, ...] of `guidance_batch` -> un + (cfg_scale + 1) (cond - un)."""
  B = both_BLV.shape[0] // 2
  cond_BLV, un_BLV = both_BLV[:B], both_BLV[B:]
  return un_BLV + (cfg_scale + 1.0) * (cond_BLV - un_BLV)


def guided_logits(model, x_BL: jax.Array, attn_BL: jax.Array | None, prompt_BL: jax.Array,
                  cfg_scale: jax.Array) -> jax.Array:
  """Unsupervised classifier-free guidance: un + (cfg_scale + 1) (cond - un), where
  `un` is the logits of x with every `prompt_BL` position set to MASK (one doubled batch)."""
  both_attn = None if attn_BL is None else jnp.concatenate([attn_BL, attn_BL])
  both_BLV = model.forward(guidance_batch(model, x_BL, prompt_BL), both_attn)
  return combine_guidance(both_BLV, cfg_scale)
