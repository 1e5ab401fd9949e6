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
from jax.sharding import PartitionSpec as P

from llada_jax import sharding
from llada_jax.layers import masks


# Logical axes of a layer's cached keys/values [B, S, K, H] (sharded like the activations).
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
  """Keys (after RoPE) and values of every layer and position: [Y, B, S, K, H]."""
  k_YBSKH: jax.Array
  v_YBSKH: jax.Array

  def constrained(self) -> "KVCache":
    """Both arrays constrained on the active mesh (`layers` + `KV_AXES`)."""
    return KVCache(*(sharding.constrain(a, ("layers",) + KV_AXES) for a in self))


def xla_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                  mask_BS: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v, scores and softmax in float32.

  `mask_BS` (1 = real key, 0 = padding) gives padded keys the float32 minimum
  as score; padded queries still produce (ignored) outputs. A [B, L, S] mask
  is per query (block-causal, `layers.masks`). -> [B, L, N, H].

  Heads-major layout, q scaled before the scores and the softmax's division
  applied to the [.., L, H] output rather than the [.., L, S] probabilities:
  the same function, with two fewer passes over the scores (about twice as
  fast on CPU at small head counts, `benchmarks/forward.py`).
  """
  B, L, N, H = q_BLNH.shape
  K = k_BSKH.shape[2]
  q_BLKGH = (q_BLNH * (1.0 / jnp.sqrt(jnp.float32(H))).astype(q_BLNH.dtype)).reshape(
      B, L, K, N // K, H)
  q_BKGLH = jnp.transpose(q_BLKGH, (0, 2, 3, 1, 4))
  k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
  scores_BKGLS = jnp.einsum("bkglh,bksh->bkgls", q_BKGLH, k_BKSH,
                            preferred_element_type=jnp.float32)
  if mask_BS is not None:
    keep = mask_BS.astype(bool)
    keep_B11LS = keep[:, None, None, None, :] if keep.ndim == 2 else keep[:, None, None]
    scores_BKGLS = jnp.where(keep_B11LS, scores_BKGLS, jnp.finfo(jnp.float32).min)
  max_BKGL1 = jax.lax.stop_gradient(jnp.max(scores_BKGLS, axis=-1, keepdims=True))
  exp_BKGLS = jnp.exp(scores_BKGLS - max_BKGL1)
  sum_BKGL1 = jnp.sum(exp_BKGLS, axis=-1, keepdims=True)
  out_BKGLH = jnp.einsum("bkgls,bksh->bkglh", exp_BKGLS.astype(v_BSKH.dtype), v_BKSH,
                         preferred_element_type=jnp.float32) / sum_BKGL1
  return jnp.transpose(out_BKGLH, (0, 3, 1, 2, 4)).reshape(B, L, N, H).astype(q_BLNH.dtype)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool,
                   block_length: int | None = None):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  full = (sm.FullMask((q_len, kv_len)) if block_length is None
          else masks.splash_mask(q_len, kv_len, block_length))
  mask = sm.MultiHeadMask([full] * num_heads)
  # Concrete mask tables even when first built inside a trace (shard_map, jit): the
  # kernel is cached and reused by later traces.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BLNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     mask_BS: jax.Array | None = None, interpret: bool = False,
                     block_length: int | None = None) -> jax.Array:
  """The TPU Pallas splash-attention kernel with a full (non-causal) mask, or
  the block-causal one of `block_length` (`layers.masks`).

  Padding is expressed as segment ids (real = 1, pad = 0), so real queries see
  only real keys, as in `xla_attention`. Needs L and S multiples of 128 on TPU;
  `interpret=True` runs the kernel's reference interpreter (any backend).
  Under a `sharding.activation_mesh` the kernel runs in `jax.shard_map`: batch
  over the mesh axes of `batch`, heads over those of `heads` (a dimension that
  does not divide its axes is replicated, as everywhere in `sharding`).
  """
  B, L, N, H = q_BLNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  scale = 1.0 / jnp.sqrt(jnp.float32(H)).astype(q_BLNH.dtype)
  q_BNLH = jnp.transpose(q_BLNH * scale, (0, 2, 1, 3))
  # The kernel takes one kv head per query head: group by repeating.
  k_BNSH = jnp.repeat(jnp.transpose(k_BSKH, (0, 2, 1, 3)), N // K, axis=1)
  v_BNSH = jnp.repeat(jnp.transpose(v_BSKH, (0, 2, 1, 3)), N // K, axis=1)
  segments = None
  if mask_BS is not None:
    seg_BS = mask_BS.astype(jnp.int32)
    segments = (seg_BS if L == S else jnp.ones((B, L), jnp.int32), seg_BS)
  local = functools.partial(_splash_local, interpret=interpret, block_length=block_length)
  mesh, rules = sharding.active_mesh()
  if mesh is not None:
    heads = sharding.logical_to_spec(("batch", "heads", None, None), rules, mesh,
                                     q_BNLH.shape, warn=False)
    rows = P(heads[0], None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows),
                          out_specs=heads, check_vma=False)
  out_BNLH = local(q_BNLH, k_BNSH, v_BNSH, segments)
  return jnp.transpose(out_BNLH, (0, 2, 1, 3)).astype(q_BLNH.dtype)


def _splash_local(q_BNLH, k_BNSH, v_BNSH, segments, *, interpret, block_length):
  """The kernel on (one device's shard of) the heads-major inputs; `segments` =
  (q ids [B, L], kv ids [B, S]) or None."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk)
  _, N, L, _ = q_BNLH.shape
  kernel = _splash_kernel(N, L, k_BNSH.shape[2], interpret, block_length)
  if segments is None:
    return jax.vmap(kernel)(q_BNLH, k_BNSH, v_BNSH)
  ids = sk.SegmentIds(q=segments[0], kv=segments[1])
  return jax.vmap(kernel)(q_BNLH, k_BNSH, v_BNSH, segment_ids=ids)


def _on_tpu() -> bool:
  """Whether the code is traced for TPUs: the active mesh's devices (an AOT compile
  for a TPU topology from a CPU host included), else the default backend."""
  mesh, _ = sharding.active_mesh()
  if mesh is not None:
    return mesh.devices.flat[0].platform == "tpu"
  return jax.default_backend() == "tpu"


def attention(q_BLNH, k_BSKH, v_BSKH, mask_BS=None, *, impl: str = "xla"):
  """Dispatch on `impl` ("xla" | "splash"); splash falls back to XLA off TPU.

  `mask_BS`: None, {0,1} [B, S] key padding, a `masks.BlockCausal`, or a
  `masks.BlockDiffusion` (always the XLA path: no splash kernel for it yet).
  """
  if isinstance(mask_BS, masks.BlockDiffusion):  # training only: the XLA path
    return xla_attention(q_BLNH, k_BSKH, v_BSKH,
                         mask_BS.keep_BLS(q_BLNH.shape[1], k_BSKH.shape[1]))
  if isinstance(mask_BS, masks.BlockCausal):
    L, S = q_BLNH.shape[1], k_BSKH.shape[1]
    if impl == "splash" and _on_tpu() and mask_BS.splash_ready(L, S):
      return splash_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS.keys_BS,
                              block_length=mask_BS.block_length)
    return xla_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS.keep_BLS(L, S))
  if impl == "splash" and _on_tpu():
    return splash_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS)
  return xla_attention(q_BLNH, k_BSKH, v_BSKH, mask_BS)


def _project(x_BWD: jax.Array, w_DXH: jax.Array) -> jax.Array:
  return jnp.einsum("bwd,dxh->bwxh", x_BWD, w_DXH.astype(x_BWD.dtype))


def self_attention(p: dict[str, jax.Array], n_BWD: jax.Array, mask_BS: jax.Array | None,
                   sin_WR: jax.Array, cos_WR: jax.Array, *, impl: str, eps: float,
                   kv_BSKH=None, start=0, fresh_from=None, rows=None):
  """The attention sublayer on normed inputs n [B, W, D] -> (out [B, W, D], (k, v)).

  p: q_proj [D, N, H], k_proj/v_proj [D, K, H], attn_out [N, H, D], and
  optionally q_norm/k_norm [H] (per-head RMSNorm before RoPE, `eps`). RoPE
  rotates the first R dims of each head (R = the tables' width).
  Without `kv_BSKH` the W positions attend to themselves (S = W). With a cached
  (k, v) pair of length S, the window's fresh keys/values are written into it
  at `start` and the window attends to all S positions; window positions
  before `fresh_from` (absolute, may be traced) keep the cached ones instead.
  (k, v) [B, S, K, H] are returned after RoPE.
  rows = (r0, Q) (r0 may be traced, Q static; no cache): only positions
  r0…r0+Q−1 query (out [B, Q, D]); keys/values are those of all W. A mask must
  then be per key ([B, S] padding), not per query.
  """
  from llada_jax.layers.norms import rms_norm  # pylint: disable=g-import-not-at-top
  from llada_jax.layers.rope import apply_rope  # pylint: disable=g-import-not-at-top
  dt = n_BWD.dtype
  nq_BQD, sin_QR, cos_QR = n_BWD, sin_WR, cos_WR  # the query positions' inputs
  if rows is not None:
    if kv_BSKH is not None:
      raise ValueError("self_attention: `rows` computes keys/values afresh; got a cache")
    nq_BQD, sin_QR, cos_QR = (jax.lax.dynamic_slice_in_dim(a, rows[0], rows[1], axis=a.ndim - 2)
                              for a in (n_BWD, sin_WR, cos_WR))
  q_BQNH = _project(nq_BQD, p["q_proj"])
  k_BWKH, v_BWKH = (_project(n_BWD, p[name]) for name in ("k_proj", "v_proj"))
  if "q_norm" in p:
    q_BQNH, k_BWKH = rms_norm(q_BQNH, p["q_norm"], eps), rms_norm(k_BWKH, p["k_norm"], eps)
  q_BQNH = sharding.constrain(apply_rope(q_BQNH, sin_QR, cos_QR),
                              ("batch", "length", "heads", "head_dim"))
  k_BWKH = sharding.constrain(apply_rope(k_BWKH, sin_WR, cos_WR),
                              ("batch", "length", "kv_heads", "head_dim"))
  if kv_BSKH is None:
    k_BSKH, v_BSKH = k_BWKH, v_BWKH
  else:
    W = n_BWD.shape[1]
    if fresh_from is not None:
      stale_W1 = (start + jnp.arange(W) < fresh_from)[:, None, None]
      k_BWKH, v_BWKH = (
          jnp.where(stale_W1, jax.lax.dynamic_slice_in_dim(cached, start, W, axis=1), fresh)
          for fresh, cached in ((k_BWKH, kv_BSKH[0]), (v_BWKH, kv_BSKH[1])))
    k_BSKH, v_BSKH = (
        sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
            cached, fresh.astype(cached.dtype), start, axis=1), KV_AXES)
        for fresh, cached in ((k_BWKH, kv_BSKH[0]), (v_BWKH, kv_BSKH[1])))
  att_BQNH = attention(q_BQNH, k_BSKH.astype(dt), v_BSKH.astype(dt), mask_BS, impl=impl)
  out_BQD = jnp.einsum("bqnh,nhd->bqd", att_BQNH, p["attn_out"].astype(dt))
  return out_BQD, (k_BSKH, v_BSKH)
