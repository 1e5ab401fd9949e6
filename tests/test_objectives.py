"""Objectives vs a direct numpy computation on a fixed mask (SPEC §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llada_jax.training import objectives

MASK_ID = 7


def _np_ce(logits_BLV, targets_BL):
  logits = logits_BLV.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logz - np.take_along_axis(logits, targets_BL[..., None], -1)[..., 0]


def _batch(B=4, L=12, V=11, seed=0):
  rs = np.random.RandomState(seed)
  return rs.randint(0, V, (B, L)), rs.randn(B, L, V).astype(np.float32)


def test_pretrain_loss_matches_numpy():
  ids_BL, logits_BLV = _batch()
  B, L = ids_BL.shape
  noise = objectives.pretrain_noise(jax.random.key(1), jnp.asarray(ids_BL), MASK_ID,
                                    crop_prob=0.0)
  masked = np.asarray(noise.masked_BL)
  p_mask = np.asarray(noise.p_mask_BL)
  assert masked.any() and (p_mask >= objectives.EPS).all() and (p_mask <= 1).all()
  np.testing.assert_array_equal(np.asarray(noise.noisy_BL), np.where(masked, MASK_ID, ids_BL))
  assert np.all(p_mask == p_mask[:, :1])  # one t per row
  ce = _np_ce(logits_BLV, ids_BL)
  want = (ce * masked / p_mask).sum() / (B * L)
  got = objectives.masked_loss(jnp.asarray(logits_BLV), jnp.asarray(ids_BL), noise)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_pretrain_crop_normalises_by_crop_length():
  ids_BL, logits_BLV = _batch()
  B, L = ids_BL.shape
  noise = objectives.pretrain_noise(jax.random.key(3), jnp.asarray(ids_BL), MASK_ID,
                                    crop_prob=1.0)
  keep = np.asarray(noise.attention_mask_BL)[0].astype(bool)
  n = keep.sum()
  assert 1 <= n <= L and np.all(keep[:n]) and not keep[n:].any()
  assert not np.asarray(noise.masked_BL)[:, n:].any()
  ce = _np_ce(logits_BLV, ids_BL)
  masked = np.asarray(noise.masked_BL)
  want = (ce * masked / np.asarray(noise.p_mask_BL))[:, :n].sum() / (B * n)
  got = objectives.masked_loss(jnp.asarray(logits_BLV), jnp.asarray(ids_BL), noise)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_crop_equals_running_the_shorter_sequence(tiny_model):
  """Hiding keys past the crop gives the logits of the cropped sequence."""
  ids_BL = jnp.asarray(np.random.RandomState(0).randint(0, 900, (2, 10)))
  n = 6
  mask_BL = (jnp.arange(10) < n)[None].repeat(2, 0).astype(jnp.int32)
  full = tiny_model(ids_BL, mask_BL)[:, :n]
  short = tiny_model(ids_BL[:, :n])
  np.testing.assert_allclose(np.asarray(full), np.asarray(short), atol=1e-5)


def test_masking_rate_follows_t():
  ids_BL = jnp.zeros((4096, 64), jnp.int32)
  noise = objectives.pretrain_noise(jax.random.key(0), ids_BL, MASK_ID, crop_prob=0.0)
  frac_B = np.asarray(noise.masked_BL).mean(1)
  p_B = np.asarray(noise.p_mask_BL)[:, 0]
  assert abs(np.mean(frac_B - p_B)) < 0.003  # unbiased masking
  assert abs(p_B.mean() - 0.5) < 0.02  # t ~ U(0, 1)


def test_sft_loss_matches_numpy():
  ids_BL, logits_BLV = _batch(seed=2)
  B, L = ids_BL.shape
  prompt_len_B = np.array([3, 5, 0, 11])
  noise = objectives.sft_noise(jax.random.key(5), jnp.asarray(ids_BL),
                               jnp.asarray(prompt_len_B), MASK_ID)
  masked = np.asarray(noise.masked_BL)
  prompt = np.arange(L)[None] < prompt_len_B[:, None]
  assert not (masked & prompt).any(), "a prompt token was masked"
  np.testing.assert_array_equal(np.asarray(noise.noisy_BL)[prompt], ids_BL[prompt])
  ce = _np_ce(logits_BLV, ids_BL)
  per_row = (ce * masked / np.asarray(noise.p_mask_BL)).sum(1) / (L - prompt_len_B)
  want = per_row.mean()
  got = objectives.masked_loss(jnp.asarray(logits_BLV), jnp.asarray(ids_BL), noise)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("prompt", [False, True])
def test_elbo_noise_is_stratified(prompt):
  ids_BL = jnp.zeros((8, 16), jnp.int32)
  prompt_len_B = jnp.full((8,), 4) if prompt else None
  noise = objectives.elbo_noise(jax.random.key(0), ids_BL, MASK_ID, prompt_len_B)
  t_B = (np.asarray(noise.p_mask_BL)[:, 0] - objectives.EPS) / (1 - objectives.EPS)
  np.testing.assert_array_equal(np.floor(t_B * 8), np.arange(8))
  if prompt:
    assert not np.asarray(noise.masked_BL)[:, :4].any()


@pytest.mark.parametrize("chunk", [8, 16, 36, 37])  # 36: the last chunk overlaps 35 columns
def test_chunked_cross_entropy_equals_full_logits(chunk):
  rs = np.random.RandomState(0)
  x_BLD = jnp.asarray(rs.randn(2, 5, 8), jnp.float32)
  head_DV = jnp.asarray(rs.randn(8, 37), jnp.float32)
  targets_BL = jnp.asarray(rs.randint(0, 37, (2, 5)))
  g_BL = jnp.asarray(rs.randn(2, 5), jnp.float32)  # a cotangent that weights every position
  full = lambda x, h: objectives.cross_entropy(jnp.einsum("bld,dv->blv", x, h) * 0.5,
                                               targets_BL)
  chunked = lambda x, h: objectives.chunked_cross_entropy(x, h, targets_BL, chunk, 0.5)
  want = _np_ce(np.einsum("bld,dv->blv", np.asarray(x_BLD, np.float64), head_DV) * 0.5,
                np.asarray(targets_BL))
  np.testing.assert_allclose(np.asarray(jax.jit(chunked)(x_BLD, head_DV)), want, rtol=1e-5)
  grads = [jax.grad(lambda x, h, f=f: jnp.sum(f(x, h) * g_BL), (0, 1))(x_BLD, head_DV)
           for f in (full, jax.jit(chunked))]
  for want_g, got_g in zip(*grads):
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-6)
