"""A sampler step's reveal rule (`reveal`, pure) and its parts: fixed, threshold, factor.

`reveal` takes the canvas of a window, its logits and the step's key and
returns the canvas with some masked positions filled: each gets the model's
token (argmax, or Gumbel-max at temperature > 0) and a confidence (its
probability, or uniform noise for "random" remasking); the rule says how many
of the most confident it keeps. Every rule reduces to a per-row count k_B of
candidates to accept; `topk_mask` then reveals the k_B most confident
candidates of each row (a `lax.top_k` of the static bound on the count, or one
sort per row), so rows with different counts share one program.

- fixed (SPEC §3): a block holding n masks revealed over the block's `steps` steps takes
  n // steps per step, one more in the first n % steps steps (`step_counts`).
- threshold τ (Fast-dLLM): the most confident candidate plus every candidate
  with confidence ≥ τ (`threshold_counts`).
- factor f (Fast-dLLM): candidates ranked by descending confidence c_(1) ≥
  c_(2) ≥ …; the top one is always accepted, and rank n ≥ 2 while every rank
  2…n has c_(m) ≥ 1 − f/(m+1) (`factor_counts`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

RULES = ("fixed", "threshold", "factor")


def reveal(x_BW: jax.Array, logits_BWV: jax.Array, key: jax.Array, *, step, masks_B,
           temperature, value, s: Any, mask_id: int, stop_ids: tuple[int, ...],
           candidate_BW: jax.Array | None = None, offset=0, max_k: int | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """One denoising step on a window of the canvas (SPEC §3), as a pure function.

  Args:
    x_BW: int32 [B, W] tokens of the window, `mask_id` where still unknown.
    logits_BWV: float32 [B, W, V] (guided and EOS-masked already).
    key: the step's PRNG key (split into the Gumbel and the random-remasking key;
      each position's noise is `position_noise` of it).
    step, masks_B: the step's index in its block and int32 [B] masks the block
      held at its start (the fixed rule's counts; unused otherwise).
    temperature, value: traced scalars: the sampling temperature (used when
      s.sample) and the threshold / factor (when s.rule is one).
    s: the static settings (`sample`, `remasking`, `rule`, `steps_per_block`,
      `confidence_eos_eot_inf`).
    stop_ids: EOS (and EoT) ids, for confidence_eos_eot_inf.
    candidate_BW: bool, positions that may be revealed (default: every masked one).
    offset: the window's first position in the generated part (may be traced).
    max_k: a static bound on the positions a row reveals (`topk_mask`).
  Returns:
    (x_BW with the revealed positions filled, bool [B, W] revealed).
  """
  B, W, V = logits_BWV.shape
  key_gumbel, key_remask = jax.random.split(key)
  if s.sample:
    g_BWV = position_noise(lambda k: jax.random.gumbel(k, (B, V), jnp.float32), key_gumbel,
                           offset, W)
    x0_BW = first_argmax(logits_BWV / temperature + g_BWV)
  else:
    x0_BW = first_argmax(logits_BWV)
  stops = jnp.asarray(stop_ids, jnp.int32)
  if s.remasking == "low_confidence":
    conf_logits_BWV = logits_BWV
    if s.confidence_eos_eot_inf:  # the reference meant this for both ids (SPEC §3)
      conf_logits_BWV = logits_BWV.at[..., stops].set(-jnp.inf)
    conf_BW = token_prob(conf_logits_BWV, x0_BW)
  else:
    conf_BW = position_noise(lambda k: jax.random.uniform(k, (B,), jnp.float32), key_remask,
                             offset, W)
  if s.confidence_eos_eot_inf:
    conf_BW = jnp.where(jnp.isin(x0_BW, stops), -jnp.inf, conf_BW)
  candidate_BW = (x_BW == mask_id) if candidate_BW is None else candidate_BW
  if s.rule == "fixed":
    k_B = step_counts(masks_B, s.steps_per_block, step)
  else:
    k_B = adaptive_counts(s.rule, conf_BW, candidate_BW, value)
  revealed_BW = topk_mask(conf_BW, k_B, candidate_BW, max_k)
  return jnp.where(revealed_BW, x0_BW, x_BW), revealed_BW


def position_noise(draw, key: jax.Array, offset, width: int) -> jax.Array:
  """[B, width, ...]: column j is draw(fold_in(key, offset + j)) (draw: key -> [B, ...]),
  so a position's noise depends on its index, not on the window it is computed in."""
  pos_W = offset + jnp.arange(width, dtype=jnp.int32)
  return jax.vmap(lambda p: draw(jax.random.fold_in(key, p)), out_axes=1)(pos_W)


def first_argmax(x_BWV: jax.Array) -> jax.Array:
  """int32 [B, W]: `jnp.argmax(x, -1)` (the first index of the maximum) for finite x, as a
  max and a min-reduction: XLA:CPU vectorises these, not argmax's (value, index) reduce
  (~10x slower at V = 1024). A NaN row gives V - 1."""
  V = x_BWV.shape[-1]
  max_BW1 = jnp.max(x_BWV, axis=-1, keepdims=True)
  index_BWV = jax.lax.broadcasted_iota(jnp.int32, x_BWV.shape, x_BWV.ndim - 1)
  first_BW = jnp.min(jnp.where(x_BWV == max_BW1, index_BWV, V), axis=-1)
  return jnp.minimum(first_BW, V - 1)


def token_prob(logits_BWV: jax.Array, x_BW: jax.Array) -> jax.Array:
  """softmax(logits)[x], computed as the reference's softmax does (max-shifted)."""
  shifted_BWV = logits_BWV - jnp.max(logits_BWV, axis=-1, keepdims=True)
  picked_BW = jnp.take_along_axis(shifted_BWV, x_BW[..., None], axis=-1)[..., 0]
  return jnp.exp(picked_BW) / jnp.sum(jnp.exp(shifted_BWV), axis=-1)


def topk_mask(score_BL: jax.Array, k_B: jax.Array, valid_BL: jax.Array,
              max_k: int | None = None) -> jax.Array:
  """bool [B, L]: per row, the k_B[row] valid positions with the highest score.

  Valid positions rank first, then by descending score, then by position
  (valid positions with score -inf still rank above invalid ones). With a
  static bound max_k ≥ max(k_B) smaller than L, one `lax.top_k` of max_k per
  row (ties to the lower index) replaces the sort of the whole row.
  """
  B, L = score_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  if max_k is not None and max_k < L:
    key_BL = jnp.where(valid_BL, _ordered_int(score_BL), jnp.iinfo(jnp.int32).min)
    _, top_BK = jax.lax.top_k(key_BL, max_k)
    take_BK = jnp.arange(max_k) < k_B[:, None]
    hit_BL = jnp.any((pos_BL[:, :, None] == top_BK[:, None, :]) & take_BK[:, None, :], axis=2)
    return valid_BL & hit_BL
  invalid_BL = (~valid_BL).astype(jnp.int32)
  _, _, order_BL = jax.lax.sort((invalid_BL, -score_BL, pos_BL), dimension=1, num_keys=2)
  rank_BL = jnp.argsort(order_BL, axis=1)
  return valid_BL & (rank_BL < k_B[:, None])


def _ordered_int(x: jax.Array) -> jax.Array:
  """int32 keys ordered as the float32 values (-inf above int32 min; no NaN)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def step_counts(n_B: jax.Array, steps: int, step: jax.Array) -> jax.Array:
  """Tokens to reveal at `step` of a block holding n_B masks: n // steps, and one
  more in the first n % steps steps (the reference's get_num_transfer_tokens)."""
  return n_B // steps + (step < n_B % steps).astype(n_B.dtype)


def threshold_counts(conf_BL: jax.Array, valid_BL: jax.Array, threshold: jax.Array
                     ) -> jax.Array:
  """int32 [B]: max(1, #valid positions with confidence ≥ threshold)."""
  passing_B = jnp.sum(valid_BL & (conf_BL >= threshold), axis=1, dtype=jnp.int32)
  return jnp.maximum(passing_B, 1)


def factor_counts(conf_BL: jax.Array, valid_BL: jax.Array, factor: jax.Array) -> jax.Array:
  """int32 [B]: 1 + the length of the run of ranks n = 2, 3, … (descending
  confidence among valid positions) with c_(n) ≥ 1 − factor / (n + 1)."""
  L = conf_BL.shape[1]
  sorted_BL = -jnp.sort(jnp.where(valid_BL, -conf_BL, jnp.inf), axis=1)  # invalid -> -inf
  rank_L = jnp.arange(1, L + 1, dtype=jnp.float32)
  passing_BL = sorted_BL >= 1.0 - factor / (rank_L + 1.0)
  run_B = jnp.sum(jnp.cumprod(passing_BL[:, 1:].astype(jnp.int32), axis=1), axis=1)
  return (1 + run_B).astype(jnp.int32)


def adaptive_counts(rule: str, conf_BL: jax.Array, valid_BL: jax.Array, value: jax.Array
                    ) -> jax.Array:
  """Counts of the "threshold" or "factor" rule (`value` = τ or f)."""
  if rule == "threshold":
    return threshold_counts(conf_BL, valid_BL, value)
  if rule == "factor":
    return factor_counts(conf_BL, valid_BL, value)
  raise ValueError(f"rule: {rule!r} is not 'threshold' or 'factor'")
