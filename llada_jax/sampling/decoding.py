"""Which masked positions a sampler step reveals: fixed counts, threshold, factor.

Every rule reduces to a per-row count k_B of candidates to accept; `topk_mask`
then reveals the k_B most confident candidates of each row (one sort per row),
so rows with different counts share one program.

- fixed (SPEC §3): a block holding n masks revealed over the block's `steps` steps takes
  n // steps per step, one more in the first n % steps steps (`step_counts`).
- threshold τ (Fast-dLLM): the most confident candidate plus every candidate
  with confidence ≥ τ (`threshold_counts`).
- factor f (Fast-dLLM): candidates ranked by descending confidence c_(1) ≥
  c_(2) ≥ …; the top one is always accepted, and rank n ≥ 2 while every rank
  2…n has c_(m) ≥ 1 − f/(m+1) (`factor_counts`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RULES = ("fixed", "threshold", "factor")


def topk_mask(score_BL: jax.Array, k_B: jax.Array, valid_BL: jax.Array) -> jax.Array:
  """bool [B, L]: per row, the k_B[row] valid positions with the highest score.

  One sort per row orders valid positions first, then by descending score, then
  by position; a position is taken when its rank < k_row. Valid positions with
  score -inf still rank above invalid ones.
  """
  B, L = score_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  invalid_BL = (~valid_BL).astype(jnp.int32)
  _, _, order_BL = jax.lax.sort((invalid_BL, -score_BL, pos_BL), dimension=1, num_keys=2)
  rank_BL = jnp.argsort(order_BL, axis=1)
  return valid_BL & (rank_BL < k_B[:, None])


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
