"""Block-causal attention masks of block-diffusion models (LLaDA2.x).

Positions are split into blocks of `block_length` counted from position 0; a
query in block i attends to every key in blocks <= i (bidirectional inside its
block, nothing to its right):

  keep(q, k) = (k // block_length) <= (q // block_length)   [and key k is real]

`BlockCausal` carries that rule through the model to `layers.attention`,
which turns it into a [B, L, S] mask for the XLA path or a splash-kernel mask
(`splash_mask`) on TPU. Queries may be a window of the positions (`q_start`,
traced or not) attending to a longer key range (a KV cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """Block-causal mask: block_length (static), keys_BS ({0,1} [B, S], 1 = real
  key, or None), q_start (absolute position of query 0; int or traced)."""
  block_length: int = dataclasses.field(metadata=dict(static=True))
  keys_BS: jax.Array | None = None
  q_start: jax.Array | int = 0

  def __post_init__(self):
    if isinstance(self.block_length, bool) or not isinstance(self.block_length, int) or (
        self.block_length < 1):
      raise ValueError(f"block_length: expected a positive integer, got {self.block_length!r}")

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


def key_mask(mask) -> jax.Array | None:
  """The key-padding part ({0,1} [B, S] or None) of a mask: BlockCausal or [B, S]."""
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
