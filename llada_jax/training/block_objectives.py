"""Block-diffusion training objectives (BD3-LM, arXiv 2503.09573; the LLaDA2 recipe), pure.

A row [L] is cut into blocks of `block_length` from position 0 (L a multiple
of it). Each block b of each row draws its own noise level t_b ~ U[t_min,
t_max], p_b = (1 − eps) t_b + eps, and each of its tokens is masked with
probability p_b. The model reads [x_t ; x_0] — the noisy row then the clean
one, 2L positions, both halves at RoPE positions 0…L−1 — under
`layers.masks.BlockDiffusion` (noisy block b sees itself and the clean blocks
before it; clean blocks see clean blocks block-causally), and only the noisy
half is scored (`objectives.weighted_loss` on its logits):

  block_pretrain: Σ_masked CE / p_b / (B·L)
  block_sft:      (1/B) Σ_rows (1/answer_len) Σ_masked CE / p_b   (prompt never masked)

With [t_min, t_max] = [0, 1] this is the negative ELBO of the
block-autoregressive model (per token); a narrower band is BD3-LM's clipped
schedule (the "mask-ratio bandwidth" of LLaDA2).

Complementary masking (LLaDA2): every row is followed by its complement — the
same tokens, masked exactly where the row is not (inside the trainable part),
at p' = 1 − p — so the batch has 2B rows, pairs adjacent (micro-batches keep
them together), and every trainable position is masked in exactly one of the
pair. The floor then applies at both ends: p = eps + (1 − 2·eps) t, so p and
1 − p are both ≥ eps.

Random-length crop (block_pretrain, as pre-training's 1%): with probability
`crop_prob` a batch is cut to K·block_length tokens, K ~ U{1..L/block_length}
(one crop for the batch); positions past it are dropped from the loss, which
is normalised by the kept length. The crop is on a block boundary, so no kept
position attends to a dropped one under the block-causal mask.

Embedding noise (LLaDA2, early training): N(0, std²) added to the embeddings
of the masked tokens while the step is below `embed_noise_steps`.

Shapes: B rows (2B with complementary masking), L length, D d_model.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from llada_jax.training import objectives


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The block objective's configuration (static under jit)."""
  block_length: int
  t_min: float = 0.0
  t_max: float = 1.0
  complementary: bool = False
  embed_noise_std: float = 0.0
  embed_noise_steps: int = 0
  eps: float = objectives.EPS
  crop_prob: float = 0.0


def block_levels(rng: jax.Array, B: int, L: int, block_length: int, t_min: float = 0.0,
                 t_max: float = 1.0) -> jax.Array:
  """float32 [B, L]: t ~ U[t_min, t_max] drawn once per block of each row."""
  if L % block_length:
    raise ValueError(f"block objective: sequence length {L} is not a multiple of "
                     f"block_length={block_length}")
  t_BN = jax.random.uniform(rng, (B, L // block_length), minval=t_min, maxval=t_max)
  return jnp.repeat(t_BN, block_length, axis=1)


def block_crop(rng: jax.Array, L: int, block_length: int, crop_prob: float
               ) -> tuple[jax.Array, jax.Array]:
  """(keep_L, kept length): with probability `crop_prob` the first K·block_length
  positions, K ~ U{1..L/block_length}; else all L."""
  crop_rng, len_rng = jax.random.split(rng)
  crop = jax.random.uniform(crop_rng) < crop_prob
  blocks = jax.random.randint(len_rng, (), 1, L // block_length + 1)
  length = jnp.where(crop, blocks * block_length, L)
  return jnp.arange(L) < length, length


def block_noise(rng: jax.Array, ids_BL: jax.Array, mask_id: int, s: BlockSettings,
                prompt_len_B: jax.Array | None = None
                ) -> tuple[jax.Array, objectives.Noise]:
  """(targets_BL, Noise) of a batch: per-block masking, the prompt (the first
  `prompt_len_B` tokens, SFT) never masked; rows doubled with `s.complementary`."""
  B, L = ids_BL.shape
  t_rng, m_rng = jax.random.split(rng)
  t_BL = block_levels(t_rng, B, L, s.block_length, s.t_min, s.t_max)
  if s.complementary:
    p_BL = s.eps + (1.0 - 2.0 * s.eps) * t_BL
  else:
    p_BL = (1.0 - s.eps) * t_BL + s.eps
  masked_BL = jax.random.uniform(m_rng, (B, L)) < p_BL
  if prompt_len_B is None:
    keep_L, length = block_crop(jax.random.fold_in(rng, 1), L, s.block_length, s.crop_prob)
    trainable_BL = jnp.broadcast_to(keep_L[None, :], (B, L))
    weight_B = jnp.full((B,), 1.0) / length
  else:
    trainable_BL = jnp.arange(L)[None, :] >= prompt_len_B[:, None]
    weight_B = 1.0 / jnp.maximum(L - prompt_len_B, 1).astype(jnp.float32)
  if s.complementary:
    pair = lambda a, b: jnp.stack([a, b], axis=1).reshape((2 * B,) + a.shape[1:])
    ids_BL, trainable_BL, weight_B = (pair(x, x) for x in (ids_BL, trainable_BL, weight_B))
    masked_BL, p_BL = pair(masked_BL, ~masked_BL), pair(p_BL, 1.0 - p_BL)
  rows = ids_BL.shape[0]
  masked_BL = masked_BL & trainable_BL
  weight_BL = jnp.broadcast_to((weight_B / rows)[:, None], (rows, L)).astype(jnp.float32)
  noisy_BL = jnp.where(masked_BL, mask_id, ids_BL).astype(jnp.int32)
  noise = objectives.Noise(noisy_BL, masked_BL, p_BL.astype(jnp.float32), weight_BL,
                           jnp.ones((rows, L), jnp.int32))
  return ids_BL.astype(jnp.int32), noise


def embedding_noise(rng: jax.Array, masked_BL: jax.Array, d_model: int, std: jax.Array
                    ) -> jax.Array:
  """float32 [B, L, D]: N(0, std²) at the masked positions, 0 elsewhere."""
  z_BLD = jax.random.normal(rng, masked_BL.shape + (d_model,), jnp.float32)
  return jnp.where(masked_BL[..., None], std * z_BLD, 0.0)


def block_inputs(rng: jax.Array, ids_BL: jax.Array, mask_id: int, s: BlockSettings,
                 d_model: int, step: jax.Array | int = 0,
                 prompt_len_B: jax.Array | None = None) -> objectives.Inputs:
  """A batch's `objectives.Inputs`: the noise of `block_noise`, and the embedding
  noise (of the noisy half) while `step` (may be traced) < s.embed_noise_steps
  (None when the std is 0)."""
  noise_rng, embed_rng = jax.random.split(rng)
  targets_BL, noise = block_noise(noise_rng, ids_BL, mask_id, s, prompt_len_B)
  embed_BLD = None
  if s.embed_noise_std > 0 and s.embed_noise_steps > 0:
    std = jnp.where(step < s.embed_noise_steps, s.embed_noise_std, 0.0)
    embed_BLD = embedding_noise(embed_rng, noise.masked_BL, d_model, std)
  return objectives.Inputs(targets_BL, noise, embed_BLD)


def model_input(noisy_BL: jax.Array, clean_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ids [B, 2L] = [x_t ; x_0], RoPE positions [2L] = 0…L−1 twice)."""
  L = noisy_BL.shape[1]
  return jnp.concatenate([noisy_BL, clean_BL], axis=1), jnp.tile(jnp.arange(L), 2)


def embed_noise_input(embed_noise_BLD: jax.Array | None) -> jax.Array | None:
  """The [B, 2L, D] embedding perturbation of the model input (zero on the clean half)."""
  if embed_noise_BLD is None:
    return None
  return jnp.concatenate([embed_noise_BLD, jnp.zeros_like(embed_noise_BLD)], axis=1)


def noisy_half(out_B2LX: jax.Array) -> jax.Array:
  """The outputs [B, L, ...] of the noisy half of a [x_t ; x_0] forward."""
  return out_B2LX[:, :out_B2LX.shape[1] // 2]
