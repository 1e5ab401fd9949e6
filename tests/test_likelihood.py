"""log_likelihood: unbiased against the fixture's exact expectation, batching, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llada_jax
from llada_jax import sharding
from llada_jax.sampling import likelihood


def test_mask_counts_are_uniform_where_half_to_even_rounding_is_not():
  for T, b in ((4, 16), (5, 16), (7, 12), (3, 1)):
    k = jnp.repeat(jnp.arange(1, T + 1), 1)
    counts = np.asarray(likelihood.mask_counts(k, jnp.full((T,), T), b))
    assert counts.min() >= 1 and counts.max() <= T
    # Over k ~ U{1..T}, every count l in 1..T is equally likely.
    hist = np.bincount(counts.ravel(), minlength=T + 1)[1:]
    assert (hist == hist[0]).all(), (T, b, hist)
  # The reference's torch.round (half to even) on linspace(k, k + 15/4 * 4 ... ): skewed.
  T, b = 4, 16
  even = [((np.round(np.linspace(k, k + (b - 1) * T / b, b)) - 1) % T + 1)
          for k in range(1, T + 1)]
  hist = np.bincount(np.concatenate(even).astype(int), minlength=T + 1)[1:]
  assert not (hist == hist[0]).all()


def test_unbiased_on_the_fixture(tiny_model, reference):
  """16 independent estimates at mc_num 2048: their mean is within 4 standard errors of
  the exact expectation, and the biased estimator's (0.35 nats lower) is not."""
  p, a = reference["ll_prompt"], reference["ll_answer"]
  n = 16
  estimates = llada_jax.log_likelihood(tiny_model, [p] * n, [a] * n, mc_num=2048,
                                       batch_size=16, rng=jax.random.key(3))
  assert estimates.shape == (n,) and len(set(estimates.tolist())) == n  # independent draws
  se = estimates.std(ddof=1) / np.sqrt(n)
  exact = float(reference["ll_exact"])
  assert abs(estimates.mean() - exact) < 4 * se, (estimates.mean(), exact, se)
  assert abs(estimates.mean() - (exact - 0.35)) > 4 * se  # the test has the power
  # The reference's own (biased) estimate at mc 1024 sits on the wrong side.
  assert float(reference["ll_official_mc1024"]) < exact - 0.2


def test_pairs_of_different_lengths_match_single_runs(tiny_model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 980, n) for n in (3, 9)]
  answers = [rng.integers(0, 980, n) for n in (5, 2)]
  args = dict(mc_num=32, batch_size=8, rng=jax.random.key(11))
  together = llada_jax.log_likelihood(tiny_model, prompts, answers, **args)
  assert together.shape == (2,)
  # Each pair alone at the same index draws the same masks (no padding, no mask).
  first = llada_jax.log_likelihood(tiny_model, prompts[0], answers[0], **args)
  assert isinstance(first, float)
  second = llada_jax.log_likelihood(tiny_model, prompts[1:] * 2, answers[1:] * 2, **args)[1]
  np.testing.assert_allclose(together, [first, second], rtol=1e-5)
  # mc_num=1: one forward of one row.
  assert np.isfinite(llada_jax.log_likelihood(tiny_model, prompts[1], answers[1], mc_num=1))


def test_cfg_changes_the_estimate(tiny_model, reference):
  p, a = reference["ll_prompt"], reference["ll_answer"]
  plain = llada_jax.log_likelihood(tiny_model, p, a, mc_num=32)
  guided = llada_jax.log_likelihood(tiny_model, p, a, mc_num=32, cfg_scale=1.0)
  assert np.isfinite(guided) and guided != plain


def test_sharded_model_gives_the_same_estimate(tiny_model, fixture_dir, reference):
  sharded = llada_jax.load(fixture_dir, mesh=sharding.make_mesh((2, 2, 2)))
  p, a = reference["ll_prompt"], reference["ll_answer"]
  args = dict(mc_num=16, batch_size=4, rng=2)
  want = llada_jax.log_likelihood(tiny_model, [p, p[:3]], [a, a[:2]], **args)
  got = llada_jax.log_likelihood(sharded, [p, p[:3]], [a, a[:2]], **args)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mc_num=24, batch_size=16), "mc_num"),
    (dict(mc_num=0), "mc_num"),
    (dict(batch_size=-1), "batch_size"),
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(answer=[]), "answer_ids"),
    (dict(answer=[1, 2000]), "answer_ids"),
    (dict(prompt=[[1, 2]], answer=[[3], [4]]), "prompt_ids"),
    (dict(prompt=[1] * 600), "max_sequence_length"),
])
def test_invalid_arguments(tiny_model, kwargs, name):
  prompt, answer = kwargs.pop("prompt", [1, 2, 3]), kwargs.pop("answer", [4, 5])
  with pytest.raises(ValueError, match=name):
    llada_jax.log_likelihood(tiny_model, prompt, answer, **kwargs)
