"""Block-causal attention masks of block-diffusion models (LLaDA2.x).

Positions are split into blocks of `block_length` counted from position 0; a
query in block i attends to every key in blocks <= i (bidirectional inside its
block, nothing to its right):

  keep(q, k) = (k // block_length) <= (q // block_length)   [and key k is real]

`BlockCausal` carries that rule through the model to `layers.attention`,
which turns it into a [B, L, S] mask for the XLA path or a splash-kernel mask
(`splash_mask`) on TPU. Queries may be a window of the positions (`q_start`,
traced or not) attending to a longer key range (a KV cache).

`BlockDiffusion` is the training mask of block diffusion (BD3-LM, LLaDA2): the
input is [x_t ; x_0], the noisy sequence then the clean one (2L positions,
both halves at positions 0…L−1), and with b(p) the block of p within its half

  noisy q -> noisy k:  b(k) == b(q)     (its own noisy block, bidirectionally)
  noisy q -> clean k:  b(k) <  b(q)     (the clean blocks before it)
  clean q -> clean k:  b(k) <= b(q)     (block-causal, as at generation)
  clean q -> noisy k:  never

so each noisy block is denoised from exactly the context the block sampler
gives it: the committed blocks before it, through their keys/values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _check_block_length(block_length) -> None:
  if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
    raise ValueError(f"block_length: expected a positive integer, got {block_length!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """Block-causal mask: block_length (static), keys_BS ({0,1} [B, S], 1 = real
  key, or None), q_start (absolute position of query 0; int or traced)."""
  block_length: int = dataclasses.field(metadata=dict(static=True))
  keys_BS: jax.Array | None = None
  q_start: jax.Array | int = 0

  def __post_init__(self):
    _check_block_length(self.block_length)

  def keep_BLS(self, q_len: int, kv_len: int) -> jax.Array:
    """bool [B or 1, L, S]: may query l (position q_start + l) attend to key s."""
    q_block_L = (self.q_start + jnp.arange(q_len)) // self.block_length
    k_block_S = jnp.arange(kv_len) // self.block_length
    keep_1LS = (k_block_S[None, :] <= q_block_L[:, None])[None]
    if self.keys_BS is None:
      return keep_1LS
    return keep_1LS & self.keys_BS.astype(bool)[:, None, :]

  def splash_ready(self, q_len: int, kv_len: int) -> bool:
    """Whether the splash kernel's static mask covers this call (a full forward)."""
    return isinstance(self.q_start, int) and self.q_start == 0 and q_len == kv_len


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockDiffusion:
  """The [x_t ; x_0] mask of block-diffusion training (module docstring) for an
  input of 2L positions; block_length (static). No key padding: every key is real."""
  block_length: int = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    _check_block_length(self.block_length)

  def keep_BLS(self, q_len: int, kv_len: int) -> jax.Array:
    """bool [1, 2L, 2L]: may query l attend to key s (full forwards only)."""
    if q_len != kv_len or q_len % 2:
      raise ValueError(f"BlockDiffusion: expected a [x_t ; x_0] forward of 2L positions, "
                       f"got {q_len} queries and {kv_len} keys")
    half = q_len // 2
    pos_P = jnp.arange(q_len)
    clean_P, block_P = pos_P >= half, (pos_P % half) // self.block_length
    q_clean, k_clean = clean_P[:, None], clean_P[None, :]
    q_block, k_block = block_P[:, None], block_P[None, :]
    keep_PP = jnp.where(q_clean, k_clean & (k_block <= q_block),
                        jnp.where(k_clean, k_block < q_block, k_block == q_block))
    return keep_PP[None]


MASK_TYPES = (BlockCausal, BlockDiffusion)  # the structured masks layers.attention takes


def key_mask(mask) -> jax.Array | None:
  """The key-padding part ({0,1} [B, S] or None) of a mask: a MASK_TYPES one or [B, S]."""
  if isinstance(mask, BlockDiffusion):
    return None
  return mask.keys_BS if isinstance(mask, BlockCausal) else mask


def block_causal_numpy(length: int, block_length: int) -> np.ndarray:
  """bool [L, L]: the block-causal pattern of a full sequence (for checks)."""
  blocks = np.arange(length) // block_length
  return blocks[None, :] <= blocks[:, None]


def splash_mask(q_len: int, kv_len: int, block_length: int):
  """The block-causal pattern as a lazy splash-attention mask (TPU Pallas kernel)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_mask as sm)

  class _BlockCausalMask(sm._ComputableMask):  # pylint: disable=protected-access
    """keep(q, k) = k // block_length <= q // block_length, computed per tile."""

    def __init__(self, shape, block_length):
      self.block_length = block_length
      super().__init__(shape=shape, mask_function=lambda q, k: (
          k // self.block_length <= q // self.block_length))

    def __eq__(self, other):
      return (type(self) is type(other) and self.shape == other.shape
              and self.block_length == other.block_length)

    def __hash__(self):
      return hash((type(self), self.shape, self.block_length))

  return _BlockCausalMask((q_len, kv_len), block_length)
