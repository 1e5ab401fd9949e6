"""Rotary position embeddings, half-split ("rotate_half") layout, in float32."""

import jax
import jax.numpy as jnp


def rope_tables(length: int, head_dim: int, theta: float, start=0
                ) -> tuple[jax.Array, jax.Array]:
  """float32 (sin, cos) [L, H] of positions start…start+L−1 (`start` may be traced)."""
  return rope_tables_at(start + jnp.arange(length), head_dim, theta)


def rope_tables_at(pos_L: jax.Array, head_dim: int, theta: float
                   ) -> tuple[jax.Array, jax.Array]:
  """float32 (sin, cos) [L, H] of the given integer positions [L]."""
  inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  pos_L = jnp.asarray(pos_L).astype(jnp.float32)
  angles_LH2 = pos_L[:, None] * inv_freq_H2[None, :]
  angles_LH = jnp.concatenate([angles_LH2, angles_LH2], axis=-1)
  return jnp.sin(angles_LH), jnp.cos(angles_LH)


def apply_rope(x_BLNH: jax.Array, sin_LH: jax.Array, cos_LH: jax.Array) -> jax.Array:
  """Rotates dim j with dim j + R/2 by the position's angle; computed in float32.

  R = the tables' width: when it is less than the head dim H (partial rotary
  embeddings), dims R…H−1 pass through unchanged.
  """
  rot = sin_LH.shape[-1]
  if rot < x_BLNH.shape[-1]:
    head = apply_rope(x_BLNH[..., :rot], sin_LH, cos_LH)
    return jnp.concatenate([head, x_BLNH[..., rot:]], axis=-1)
  x = x_BLNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_LH[None, :, None, :] + rotated * sin_LH[None, :, None, :]
  return out.astype(x_BLNH.dtype)
