"""Masked-diffusion training objectives of LLaDA (SPEC §5), as pure functions.

A step draws the noise for the whole batch first (`pretrain_noise`,
`sft_noise`), then scores logits with `masked_loss` (or, without ever forming
the [B, L, V] logits, final hidden states and the output head with
`chunked_masked_loss`); splitting the two lets gradient accumulation over
micro-batches see exactly the noise of one large batch. Shapes: B batch,
L length, D d_model, V logit columns.

Pre-training: t ~ U(0, 1) per row, p_mask = (1 - eps) t + eps, each token
masked with probability p_mask; loss = Σ_masked CE / p_mask / (B·L). 1% of
batches are cropped to a random length U{1..L} (same crop for the batch):
positions past the crop are dropped from the loss and hidden from attention as
keys, which equals running the shorter sequence.

SFT: the prompt is never masked; the EOS padding of the answer is trained;
loss = (1/B) Σ_rows (1/answer_len) Σ_masked CE / p_mask.

CAP (LLaDA2's confidence-aware parallel loss, `cap_entropy`) adds λ times the
entropy of the predictions on the masked tokens already predicted correctly.
The block-diffusion objectives are in `block_objectives.py`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

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


class Inputs(NamedTuple):
  """A batch's objective inputs (rows on axis 0, split into micro-batches).

  targets_BL: int32 clean tokens the loss scores.
  noise: the forward process applied to them.
  embed_noise_BLD: float32 perturbation of the masked tokens' embeddings, or None.
  """
  targets_BL: jax.Array
  noise: Noise
  embed_noise_BLD: jax.Array | None = None


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
  answer_len_B = answer_lengths(prompt_len_B, L)
  weight_BL = jnp.broadcast_to((1.0 / (B * answer_len_B))[:, None], (B, L))
  return Noise(jnp.where(prompt_BL, ids_BL, noisy_BL).astype(jnp.int32),
               masked_BL & ~prompt_BL, p_mask_BL, weight_BL.astype(jnp.float32),
               jnp.ones((B, L), jnp.int32))


def answer_lengths(prompt_len_B: jax.Array, L: int) -> jax.Array:
  """float32 [B]: the answer's length in a row of L, its EOS padding included (at least 1)."""
  return jnp.maximum(L - prompt_len_B, 1).astype(jnp.float32)


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """float32 CE [B, L] (nats) of the target column of every position."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return logz_BL - target_logit_BL


def weighted_loss(ce_BL: jax.Array, noise: Noise) -> jax.Array:
  """Σ over masked positions of CE / p_mask · weight: the batch's loss (nats)."""
  terms_BL = jnp.where(noise.masked_BL, ce_BL / noise.p_mask_BL * noise.weight_BL, 0.0)
  return jnp.sum(terms_BL)


def masked_loss(logits_BLV: jax.Array, targets_BL: jax.Array, noise: Noise) -> jax.Array:
  """The batch's loss (nats) from full logits [B, L, V]."""
  return weighted_loss(cross_entropy(logits_BLV, targets_BL), noise)


def cap_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, noise: Noise) -> jax.Array:
  """The confidence term of LLaDA2's CAP loss (L = L_SFT + λ · this): the entropy
  (nats) of the prediction at every masked position the model already predicts
  correctly (argmax = target), weighted by `noise.weight_BL` (the loss's
  per-row normaliser, without 1/p_mask), so micro-batches sum like the loss."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
  entropy_BL = -jnp.sum(jnp.exp(logp_BLV) * logp_BLV, axis=-1)
  correct_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
  return jnp.sum(jnp.where(noise.masked_BL & correct_BL, entropy_BL * noise.weight_BL, 0.0))


def chunked_masked_loss(x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                        noise: Noise, chunk: int, logit_scale: float = 1.0) -> jax.Array:
  """`masked_loss` of logits = x @ head · logit_scale, never forming [B, L, V]."""
  ce_BL = chunked_cross_entropy(x_BLD, head_DV, targets_BL, chunk, logit_scale)
  return weighted_loss(ce_BL, noise)


def model_cross_entropy(model: Any, targets_BL: jax.Array, noisy_BL: jax.Array,
                        vocab_chunk: int = 0, attention_mask_BL: jax.Array | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """float32 CE [B, L] of `model`'s predictions of `targets_BL` from `noisy_BL`, and the
  model's auxiliary losses ({} for dense models; MoE: router losses, unweighted).

  vocab_chunk > 0 (and < V): from the final hidden states over chunks of that many
  vocabulary columns, never forming the [B, L, V] logits; 0: from the full float32
  logits. Equal to float tolerance.
  """
  cfg = model.config
  chunked = 0 < vocab_chunk < cfg.embedding_size
  out, aux = model.forward_with_aux(noisy_BL, attention_mask_BL, head=not chunked)
  if not chunked:
    return cross_entropy(out, targets_BL), aux
  scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0
  return chunked_cross_entropy(out, model.head_DV().astype(out.dtype), targets_BL, vocab_chunk,
                               scale), aux


def router_penalty(cfg: Any, aux: dict[str, jax.Array]) -> jax.Array:
  """The weighted sum of a model's auxiliary losses, added to its training loss."""
  coefs = {"load_balancing_loss": cfg.router_aux_loss_coef,
           "router_z_loss": cfg.router_z_loss_coef}
  return sum((coefs[k] * v for k, v in aux.items()), jnp.float32(0.0))


# ---- vocabulary-chunked cross-entropy ----------------------------------------
# The head matmul and the logsumexp run over `chunk` columns of the vocabulary
# at a time (lax.scan, online max/sum-exp), and the custom VJP recomputes each
# chunk's logits in the backward: memory is O(B·L·chunk), not O(B·L·V). The last
# chunk starts at V - chunk (so every chunk has the same static shape); its
# columns already covered by the previous chunk are masked out.

def _chunk_starts(V: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(first column of each chunk's slice, first column the chunk counts), int32 [n]."""
  n = -(-V // chunk)
  lows = [i * chunk for i in range(n)]
  return (jnp.asarray([min(lo, V - chunk) for lo in lows], jnp.int32),
          jnp.asarray(lows, jnp.int32))


def _chunk_logits(x_BLD, head_DV, start, low, chunk, logit_scale):
  """(float32 logits [B, L, c] of columns start…start+c−1, -inf below `low`;
  the column ids [c], -1 below `low`; the head's columns [D, c])."""
  w_Dc = jax.lax.dynamic_slice_in_dim(head_DV, start, chunk, axis=1)
  logits_BLc = jnp.einsum("bld,dc->blc", x_BLD, w_Dc, preferred_element_type=jnp.float32)
  cols_c = start + jnp.arange(chunk)
  counted_c = cols_c >= low
  return (jnp.where(counted_c, logits_BLc * logit_scale, -jnp.inf),
          jnp.where(counted_c, cols_c, -1), w_Dc)


def _ce_forward(x_BLD, head_DV, targets_BL, chunk, logit_scale):
  """(CE [B, L], logsumexp [B, L]), both float32."""
  B, L, _ = x_BLD.shape

  def body(carry, start_low):
    max_BL, sum_BL, target_BL = carry
    logits_BLc, cols_c, _ = _chunk_logits(x_BLD, head_DV, *start_low, chunk, logit_scale)
    new_max_BL = jnp.maximum(max_BL, jnp.max(logits_BLc, axis=-1))
    sum_BL = (sum_BL * jnp.exp(max_BL - new_max_BL)
              + jnp.sum(jnp.exp(logits_BLc - new_max_BL[..., None]), axis=-1))
    hit_BLc = cols_c == targets_BL[..., None]
    target_BL = target_BL + jnp.sum(jnp.where(hit_BLc, logits_BLc, 0.0), axis=-1)
    return (new_max_BL, sum_BL, target_BL), None

  init = (jnp.full((B, L), -jnp.inf), jnp.zeros((B, L)), jnp.zeros((B, L)))
  (max_BL, sum_BL, target_BL), _ = jax.lax.scan(
      body, init, _chunk_starts(head_DV.shape[1], chunk))
  logz_BL = max_BL + jnp.log(sum_BL)
  return logz_BL - target_BL, logz_BL


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_cross_entropy(x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                          chunk: int, logit_scale: float = 1.0) -> jax.Array:
  """float32 CE [B, L] of logits = (x_BLD @ head_DV) · logit_scale, `chunk` columns at a time.

  x_BLD and head_DV share a dtype (the product accumulates in float32, as the
  model's head); equals `cross_entropy` of the full logits to float tolerance.
  """
  return _ce_forward(x_BLD, head_DV, targets_BL, chunk, logit_scale)[0]


def _ce_fwd(x_BLD, head_DV, targets_BL, chunk, logit_scale):
  ce_BL, logz_BL = _ce_forward(x_BLD, head_DV, targets_BL, chunk, logit_scale)
  return ce_BL, (x_BLD, head_DV, targets_BL, logz_BL)


def _ce_bwd(chunk, logit_scale, residuals, g_BL):
  """d CE/d logits = softmax − onehot, per chunk; -> (dx [B, L, D], dhead [D, V], None)."""
  x_BLD, head_DV, targets_BL, logz_BL = residuals

  def body(carry, start_low):
    dx_BLD, dhead_DV = carry
    start, _ = start_low
    logits_BLc, cols_c, w_Dc = _chunk_logits(x_BLD, head_DV, *start_low, chunk, logit_scale)
    probs_BLc = jnp.exp(logits_BLc - logz_BL[..., None])
    onehot_BLc = cols_c == targets_BL[..., None]
    dlogits_BLc = ((probs_BLc - onehot_BLc) * (g_BL[..., None] * logit_scale)).astype(x_BLD.dtype)
    dx_BLD = dx_BLD + jnp.einsum("blc,dc->bld", dlogits_BLc, w_Dc,
                                 preferred_element_type=jnp.float32)
    dw_Dc = jnp.einsum("bld,blc->dc", x_BLD, dlogits_BLc, preferred_element_type=jnp.float32)
    old_Dc = jax.lax.dynamic_slice_in_dim(dhead_DV, start, chunk, axis=1)
    dhead_DV = jax.lax.dynamic_update_slice_in_dim(
        dhead_DV, old_Dc + dw_Dc.astype(dhead_DV.dtype), start, axis=1)
    return (dx_BLD, dhead_DV), None

  init = (jnp.zeros(x_BLD.shape, jnp.float32), jnp.zeros_like(head_DV))
  (dx_BLD, dhead_DV), _ = jax.lax.scan(body, init, _chunk_starts(head_DV.shape[1], chunk))
  return dx_BLD.astype(x_BLD.dtype), dhead_DV, None


chunked_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


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
