"""VRPO, variance-reduced preference optimisation (LLaDA 1.5, arXiv 2505.19223).

DPO with every log-likelihood replaced by an ELBO estimate. For a prompt and
its chosen and rejected answers y_w, y_l:

  loss = −log σ(β [(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))])

B̂_π(y) estimates log p_π(answer | prompt) as the SFT objective does (SPEC §5:
the prompt is never masked, the answer's EOS padding is part of the answer),
in nats per answer token: the mean over n samples of
−(1/answer_len) Σ_masked CE / p_mask, sample j masking each answer token with
probability p_mask = (1 − eps)·t_j + eps. The reference π_ref is frozen.

The paper's variance reduction, both unbiased and free:
- allocation "optimal": the budget of n samples per ELBO is n timesteps with
  one mask each; "naive": one timestep with n masks.
- antithetic: π_θ and π_ref score the same noisy sequences (the same
  timesteps and masks), so their shared noise cancels in B̂_θ − B̂_ref; off,
  the reference draws its own.

Shapes: B pairs, A = 2 answers (chosen, rejected), N = n samples per ELBO,
L length, R = B·A·N rows of one forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.training import objectives

ALLOCATIONS = ("optimal", "naive")
# Logged per step (means over the batch); ELBOs in nats per answer token.
METRICS = ("reward_margin", "preference_accuracy", "elbo_policy_chosen",
           "elbo_policy_rejected", "elbo_reference_chosen", "elbo_reference_rejected",
           "score_variance")


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.vrpo`: the estimator's budget and variance reduction, and DPO's β."""
  n_samples: int = 8
  allocation: str = "optimal"
  antithetic: bool = True
  beta: float = 0.1
  eps: float = objectives.EPS

  @classmethod
  def from_config(cls, cfg: Any) -> "Settings":
    return cls(n_samples=int(cfg.n_samples), allocation=str(cfg.allocation),
                    antithetic=bool(cfg.antithetic), beta=float(cfg.beta))


class PairNoise(NamedTuple):
  """The noisy rows each model scores: fields [B, A, N, L]; `reference` None under
  antithetic sampling (the reference scores the policy's)."""
  policy: objectives.Noise
  reference: objectives.Noise | None


def pair_ids(batch: dict[str, jax.Array]) -> jax.Array:
  """int32 [B, A, L]: a preference batch's chosen (`input_ids`) and rejected rows."""
  return jnp.stack([batch["input_ids"], batch["rejected_ids"]], axis=1)


def timesteps(rng: jax.Array, shape_BA: tuple[int, int], n: int, allocation: str) -> jax.Array:
  """float32 [B, A, N] t ~ U(0, 1): N per ELBO ("optimal") or one repeated N times ("naive")."""
  if allocation == "optimal":
    return jax.random.uniform(rng, (*shape_BA, n))
  if allocation == "naive":
    return jnp.broadcast_to(jax.random.uniform(rng, (*shape_BA, 1)), (*shape_BA, n))
  raise ValueError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")


def elbo_noise(rng: jax.Array, ids_BAL: jax.Array, prompt_len_B: jax.Array, mask_id: int,
               s: Settings) -> objectives.Noise:
  """N noisy copies of every answer row (fields [B, A, N, L]); each its own mask."""
  B, A, L = ids_BAL.shape
  N = s.n_samples
  t_rng, m_rng = jax.random.split(rng)
  t_R = timesteps(t_rng, (B, A), N, s.allocation).reshape(-1)
  ids_RL = jnp.broadcast_to(ids_BAL[:, :, None], (B, A, N, L)).reshape(-1, L)
  prompt_len_R = jnp.repeat(prompt_len_B, A * N)
  noise = objectives.sft_noise(m_rng, ids_RL, prompt_len_R, mask_id, s.eps, t_R)
  return jax.tree.map(lambda x: x.reshape(B, A, N, L), noise)


def draw(rng: jax.Array, batch: dict[str, jax.Array], mask_id: int, s: Settings) -> PairNoise:
  """The noise of a preference batch ({"input_ids", "rejected_ids": [B, L],
  "prompt_len": [B]}), for the policy and the reference."""
  ids_BAL = pair_ids(batch)
  policy = elbo_noise(rng, ids_BAL, batch["prompt_len"], mask_id, s)
  if s.antithetic:
    return PairNoise(policy, None)
  return PairNoise(policy, elbo_noise(jax.random.fold_in(rng, 1), ids_BAL, batch["prompt_len"],
                                      mask_id, s))


def elbo_samples(ce_BANL: jax.Array, noise: objectives.Noise, prompt_len_B: jax.Array
                 ) -> jax.Array:
  """float32 [B, A, N]: each sample's ELBO estimate, −(1/answer_len) Σ_masked CE / p_mask."""
  answer_len_B = objectives.answer_lengths(prompt_len_B, ce_BANL.shape[-1])
  terms_BANL = jnp.where(noise.masked_BL, ce_BANL / noise.p_mask_BL, 0.0)
  return -jnp.sum(terms_BANL, axis=-1) / answer_len_B[:, None, None]


class Elbos(NamedTuple):
  """ELBO samples [B, A, N] of the policy and the (frozen) reference, and their
  differences B̂_θ − B̂_ref per sample."""
  policy_BAN: jax.Array
  reference_BAN: jax.Array
  diff_BAN: jax.Array


def preference_terms(elbos: Elbos, beta: float) -> dict[str, jax.Array]:
  """Per-pair [B] loss, margin and the rest of METRICS from the ELBO samples.

  margin = β[(B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l))] (B̂: the mean
  over N); loss = −log σ(margin); accuracy = [margin > 0]; score_variance: the
  sample variance over j of the single-sample scores divided by N, the
  variance of the margin estimate when the N samples are independent (the
  optimal allocation). NaN for N = 1.
  """
  policy_BA = jnp.mean(elbos.policy_BAN, axis=-1)
  reference_BA = jnp.mean(elbos.reference_BAN, axis=-1)
  log_ratio_BA = jnp.mean(elbos.diff_BAN, axis=-1)
  margin_B = beta * (log_ratio_BA[:, 0] - log_ratio_BA[:, 1])
  score_BN = beta * (elbos.diff_BAN[:, 0] - elbos.diff_BAN[:, 1])
  N = score_BN.shape[-1]
  variance_B = (jnp.var(score_BN, axis=-1, ddof=1) / N if N > 1
                else jnp.full(margin_B.shape, jnp.nan))
  return {"loss": -jax.nn.log_sigmoid(margin_B), "reward_margin": margin_B,
          "preference_accuracy": (margin_B > 0).astype(jnp.float32),
          "elbo_policy_chosen": policy_BA[:, 0], "elbo_policy_rejected": policy_BA[:, 1],
          "elbo_reference_chosen": reference_BA[:, 0],
          "elbo_reference_rejected": reference_BA[:, 1], "score_variance": variance_B}


def _rows(x_BANL: jax.Array) -> jax.Array:
  return x_BANL.reshape(-1, x_BANL.shape[-1])


def pair_elbos(model: Any, reference: Any, batch: dict[str, jax.Array], noise: PairNoise,
               vocab_chunk: int = 0) -> tuple[Elbos, dict[str, jax.Array]]:
  """(the ELBO samples, the policy's auxiliary losses): one forward of R rows per model;
  no gradient through the reference."""
  ids_BAL = pair_ids(batch)
  B, A, L = ids_BAL.shape
  N = noise.policy.noisy_BL.shape[2]
  targets_RL = _rows(jnp.broadcast_to(ids_BAL[:, :, None], (B, A, N, L)))

  def cross_entropy(m, nz):
    ce_RL, aux = objectives.model_cross_entropy(m, targets_RL, _rows(nz.noisy_BL), vocab_chunk)
    return ce_RL.reshape(B, A, N, L), aux

  ref_noise = noise.policy if noise.reference is None else noise.reference
  ce_policy, aux = cross_entropy(model, noise.policy)
  ce_reference = jax.lax.stop_gradient(cross_entropy(reference, ref_noise)[0])
  prompt_len_B = batch["prompt_len"]
  policy_BAN = elbo_samples(ce_policy, noise.policy, prompt_len_B)
  reference_BAN = elbo_samples(ce_reference, ref_noise, prompt_len_B)
  if noise.reference is None:
    # Shared noise: the difference from the per-token CE differences, so that equal
    # models give exactly 0 (the difference of the two sums may not: XLA can fuse a
    # sum's scaling into the subtraction as an FMA).
    diff_BAN = elbo_samples(ce_policy - ce_reference, noise.policy, prompt_len_B)
  else:
    diff_BAN = policy_BAN - reference_BAN
  return Elbos(policy_BAN, reference_BAN, diff_BAN), aux


def loss(model: Any, batch: dict[str, jax.Array], noise: PairNoise, reference: Any, *,
         s: Settings, vocab_chunk: int = 0, micro_batches: int = 1
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One micro-batch's VRPO loss (mean over the pairs of the global batch, so that
  micro-batches sum to it; plus the policy's weighted router losses) and METRICS
  (likewise summed to batch means)."""
  elbos, aux = pair_elbos(model, reference, batch, noise, vocab_chunk)
  terms = preference_terms(elbos, s.beta)
  total = terms["loss"].shape[0] * micro_batches
  metrics = {k: jnp.sum(v) / total for k, v in terms.items()}
  value = metrics.pop("loss") + objectives.router_penalty(model.config, aux) / micro_batches
  metrics["masked_tokens"] = jnp.sum(noise.policy.masked_BL)
  metrics.update({k: v / micro_batches for k, v in aux.items()})
  return value, metrics


def evaluate(model: Any, reference: Any, batch: dict[str, jax.Array], rng: jax.Array, *,
             s: Settings, vocab_chunk: int = 0) -> dict[str, jax.Array]:
  """Held-out means over a batch: `vrpo_loss` (the loss) and METRICS."""
  noise = draw(rng, batch, model.config.mask_token_id, s)
  terms = preference_terms(pair_elbos(model, reference, batch, noise, vocab_chunk)[0], s.beta)
  terms["vrpo_loss"] = terms.pop("loss")
  return {k: jnp.mean(v) for k, v in terms.items()}
