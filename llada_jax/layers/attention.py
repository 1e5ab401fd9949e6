"""Bidirectional grouped-query attention: the XLA path and the TPU splash kernel.

Shapes: B batch, L query length, S key length, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim. Kv head j serves query heads
j·G … j·G+G−1 (grouped, as torch `repeat_interleave`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  """Keys (after RoPE) and values of every layer and position: [Y, B, S, K, H]."""
  k_YBSKH: jax.Array
  v_YBSKH: jax.Array


def xla_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                  mask_BS: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v, scores and softmax in float32.

  `mask_BS` (1 = real key, 0 = padding) gives padded keys the float32 minimum
  as score; padded queries still produce (ignored) outputs. -> [B, L, N, H].
  """
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
  scores_BKGLS = jnp.einsum("blkgh,bskh->bkgls", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  scores_BKGLS = scores_BKGLS * (1.0 / jnp.sqrt(jnp.float32(H)))
  if mask_BS is not None:
    keep_B11S = mask_BS.astype(bool)[:, None, None, None, :]
    scores_BKGLS = jnp.where(keep_B11S, scores_BKGLS, jnp.finfo(jnp.float32).min)
  probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKH.dtype)
  out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", probs_BKGLS, v_BSKH,
                         preferred_element_type=jnp.float32)
  return out_BLKGH.reshape(B, L, N, H).astype(q_BLNH.dtype)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  full = sm.FullMask((q_len, kv_len))
  mask = sm.MultiHeadMask([full] * num_heads)
  return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     mask_BS: jax.Array | None = None, interpret: bool = False) -> jax.Array:
  """The TPU Pallas splash-attention kernel with a full (non-causal) mask.

  Padding is expressed as segment ids (real = 1, pad = 0), so real queries see
  only real keys, as in `xla_attention`. Needs L and S multiples of 128 on TPU;
  `interpret=True` runs the kernel's reference interpreter (any backend).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk)
  B, L, N, H = q_BLNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  kernel = _splash_kernel(N, L, S, interpret)
  scale = 1.0 / jnp.sqrt(jnp.float32(H)).astype(q_BLNH.dtype)
  q_BNLH = jnp.transpose(q_BLNH * scale, (0, 2, 1, 3))
  # The kernel takes one kv head per query head: group by repeating.
  k_BNSH = jnp.repeat(jnp.transpose(k_BSKH, (0, 2, 1, 3)), N // K, axis=1)
  v_BNSH = jnp.repeat(jnp.transpose(v_BSKH, (0, 2, 1, 3)), N // K, axis=1)
  if mask_BS is None:
    out_BNLH = jax.vmap(kernel)(q_BNLH, k_BNSH, v_BNSH)
  else:
    seg_BS = mask_BS.astype(jnp.int32)
    seg_BL = seg_BS if L == S else jnp.ones((B, L), jnp.int32)
    ids = sk.SegmentIds(q=seg_BL, kv=seg_BS)
    out_BNLH = jax.vmap(kernel)(q_BNLH, k_BNSH, v_BNSH, segment_ids=ids)
  return jnp.transpose(out_BNLH, (0, 2, 1, 3)).astype(q_BLNH.dtype)


def attention(q_BLNH, k_BSKH, v_BSKH, mask_BS=None, *, impl: str = "xla"):
  """Dispatch on `impl` ("xla" | "splash"); splash falls back to XLA off TPU."""
  if impl == "splash" and jax.default_backend() == "tpu":
    return splash_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS)
  return xla_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS)
