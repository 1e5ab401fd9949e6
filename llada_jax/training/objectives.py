"""Masked-diffusion training objectives of LLaDA (SPEC §5), as pure functions.

A step draws the noise for the whole batch first (`pretrain_noise`,
`sft_noise`), then scores logits with `masked_loss`; splitting the two lets
gradient accumulation over micro-batches see exactly the noise of one large
batch. Shapes: B batch, L length, V logit columns.

Pre-training: t ~ U(0, 1) per row, p_mask = (1 - eps) t + eps, each token
masked with probability p_mask; loss = Σ_masked CE / p_mask / (B·L). 1% of
batches are cropped to a random length U{1..L} (same crop for the batch):
positions past the crop are dropped from the loss and hidden from attention as
keys, which equals running the shorter sequence.

SFT: the prompt is never masked; the EOS padding of the answer is trained;
loss = (1/B) Σ_rows (1/answer_len) Σ_masked CE / p_mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EPS = 1e-3  # minimum masking probability
CROP_PROB = 0.01  # fraction of pre-training batches cropped to a random length


class Noise(NamedTuple):
  """The forward process applied to a batch.

  noisy_BL: int32 input with masked positions set to the mask id.
  masked_BL: bool, True where a token was masked (and is predicted).
  p_mask_BL: float32 masking probability of the row, per position.
  weight_BL: float32 normaliser per position (1/(B·L) or 1/(B·answer_len)),
    zero where a position does not count (past a crop).
  attention_mask_BL: int32 keys the model may attend to (all ones unless cropped).
  """
  noisy_BL: jax.Array
  masked_BL: jax.Array
  p_mask_BL: jax.Array
  weight_BL: jax.Array
  attention_mask_BL: jax.Array


def mask_tokens(rng: jax.Array, ids_BL: jax.Array, mask_id: int, eps: float = EPS,
                t_B: jax.Array | None = None):
  """Masks each token independently with p_mask = (1 - eps) t + eps.

  `t_B` defaults to U(0, 1) per row. -> (noisy_BL, masked_BL, p_mask_BL).
  """
  B, L = ids_BL.shape
  t_rng, m_rng = jax.random.split(rng)
  if t_B is None:
    t_B = jax.random.uniform(t_rng, (B,))
  p_mask_BL = jnp.broadcast_to(((1.0 - eps) * t_B + eps)[:, None], (B, L)).astype(jnp.float32)
  masked_BL = jax.random.uniform(m_rng, (B, L)) < p_mask_BL
  noisy_BL = jnp.where(masked_BL, mask_id, ids_BL).astype(jnp.int32)
  return noisy_BL, masked_BL, p_mask_BL


def pretrain_noise(rng: jax.Array, ids_BL: jax.Array, mask_id: int, eps: float = EPS,
                   crop_prob: float = CROP_PROB) -> Noise:
  """Noise for a pre-training batch, with the 1% random-length crop."""
  B, L = ids_BL.shape
  noise_rng, crop_rng, len_rng = jax.random.split(rng, 3)
  noisy_BL, masked_BL, p_mask_BL = mask_tokens(noise_rng, ids_BL, mask_id, eps)
  crop = jax.random.uniform(crop_rng) < crop_prob
  length = jnp.where(crop, jax.random.randint(len_rng, (), 1, L + 1), L)
  keep_L = jnp.arange(L) < length
  weight_BL = jnp.broadcast_to(jnp.where(keep_L, 1.0 / (B * length), 0.0)[None, :], (B, L))
  return Noise(noisy_BL, masked_BL & keep_L[None, :], p_mask_BL,
               weight_BL.astype(jnp.float32),
               jnp.broadcast_to(keep_L[None, :], (B, L)).astype(jnp.int32))


def sft_noise(rng: jax.Array, ids_BL: jax.Array, prompt_len_B: jax.Array, mask_id: int,
              eps: float = EPS, t_B: jax.Array | None = None) -> Noise:
  """Noise for an SFT batch: the first `prompt_len_B` tokens of a row stay clean."""
  B, L = ids_BL.shape
  noisy_BL, masked_BL, p_mask_BL = mask_tokens(rng, ids_BL, mask_id, eps, t_B)
  prompt_BL = jnp.arange(L)[None, :] < prompt_len_B[:, None]
  answer_len_B = jnp.maximum(L - prompt_len_B, 1).astype(jnp.float32)
  weight_BL = jnp.broadcast_to((1.0 / (B * answer_len_B))[:, None], (B, L))
  return Noise(jnp.where(prompt_BL, ids_BL, noisy_BL).astype(jnp.int32),
               masked_BL & ~prompt_BL, p_mask_BL, weight_BL.astype(jnp.float32),
               jnp.ones((B, L), jnp.int32))


def masked_loss(logits_BLV: jax.Array, targets_BL: jax.Array, noise: Noise) -> jax.Array:
  """Σ over masked positions of CE / p_mask · weight: the batch's loss (nats)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  ce_BL = logz_BL - target_logit_BL
  terms_BL = jnp.where(noise.masked_BL, ce_BL / noise.p_mask_BL * noise.weight_BL, 0.0)
  return jnp.sum(terms_BL)


def elbo_noise(rng: jax.Array, ids_BL: jax.Array, mask_id: int,
               prompt_len_B: jax.Array | None = None, eps: float = EPS) -> Noise:
  """Noise for evaluating the ELBO: stratified t = (j + u)/B, no crop.

  `masked_loss` under this noise is an unbiased estimate of the negative
  ELBO in nats per (answer) token; the stratification only lowers variance.
  """
  B = ids_BL.shape[0]
  t_rng, m_rng = jax.random.split(rng)
  t_B = (jnp.arange(B) + jax.random.uniform(t_rng)) / B
  if prompt_len_B is None:
    prompt_len_B = jnp.zeros((B,), jnp.int32)
  return sft_noise(m_rng, ids_BL, prompt_len_B, mask_id, eps, t_B)
