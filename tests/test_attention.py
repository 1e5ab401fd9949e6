"""Attention kernels against a direct numpy computation."""

import jax
import numpy as np
import pytest

from llada_jax import sharding
from llada_jax.layers import attention, masks


def _numpy_attention(q, k, v, mask):
  B, L, N, H = q.shape
  K = k.shape[2]
  k = np.repeat(k, N // K, axis=2)  # grouped: kv head j serves query heads j*G..j*G+G-1
  v = np.repeat(v, N // K, axis=2)
  s = np.einsum("blnh,bsnh->bnls", q, k) / np.sqrt(H)
  if mask is not None:
    s = np.where(mask[:, None, None, :].astype(bool), s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnls,bsnh->blnh", p, v)


def _inputs(L=128, N=4, K=2, H=32, B=2, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(B, L, n, H)).astype(np.float32) for n in (N, K, K))
  mask = np.ones((B, L), np.int32)
  mask[1, :7] = 0  # left padding
  return q, k, v, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_xla_attention_matches_numpy(use_mask):
  q, k, v, mask = _inputs(L=20)
  mask = mask if use_mask else None
  got = np.asarray(attention.xla_attention(q, k, v, mask))
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5)


def test_padded_keys_get_no_weight():
  q, k, v, mask = _inputs(L=20)
  changed = v.copy()
  changed[1, :7] = 100.0  # values at padded keys must not leak into real queries
  a = np.asarray(attention.xla_attention(q, k, v, mask))
  b = np.asarray(attention.xla_attention(q, k, changed, mask))
  np.testing.assert_allclose(a[1, 7:], b[1, 7:], atol=1e-6)


@pytest.mark.parametrize("use_mask", [False, True])
def test_splash_kernel_matches_xla_in_interpret_mode(use_mask):
  # The TPU Pallas kernel run by its interpreter on CPU: same numbers as XLA.
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  q, k, v, mask = _inputs(L=128)
  mask = mask if use_mask else None
  got = np.asarray(attention.splash_attention(q, k, v, mask, interpret=True))
  want = np.asarray(attention.xla_attention(q, k, v, mask))
  rows = slice(None) if mask is None else mask.astype(bool)
  np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)


def test_dispatch_falls_back_to_xla_off_tpu():
  q, k, v, mask = _inputs(L=16)
  assert jax.default_backend() != "tpu"
  np.testing.assert_array_equal(attention.attention(q, k, v, mask, impl="splash"),
                                attention.xla_attention(q, k, v, mask))


@pytest.mark.parametrize("block_length", [None, 32])
def test_splash_under_shard_map_matches_xla_on_8_devices(block_length):
  # Batch over data, heads over tensor: each device runs the interpreted kernel
  # on its shard; same numbers as unsharded XLA (block-causal mask too).
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  mesh = sharding.make_mesh((2, 1, 4))
  q, k, v, mask = _inputs(L=128, N=8, K=4, B=2)
  keep = mask if block_length is None else masks.BlockCausal(block_length, mask).keep_BLS(128, 128)
  with sharding.activation_mesh(mesh):
    run = jax.jit(lambda q, k, v, m: attention.splash_attention(
        q, k, v, m, interpret=True, block_length=block_length))
    got = run(q, k, v, mask)
  assert got.sharding.shard_shape(got.shape) == (1, 128, 2, 32)  # B / data, N / tensor
  want = np.asarray(attention.xla_attention(q, k, v, keep))
  rows = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=1e-5)
