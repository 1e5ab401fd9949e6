"""VRPO: the loss against numpy on fixed masks, the estimator's allocation and
antithetic sampling, the config and reference checks, and a resumed trainer run
(the tiny fixture; 8 fake CPU devices)."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from llada_jax.training import train
from llada_jax.training import validate
from llada_jax.training import vrpo
from tests import fixture_copy

B, L = 3, 20
PROMPT_LEN = np.array([4, 7, 10], np.int32)


def _batch():
  rs = np.random.RandomState(0)
  chosen = rs.randint(0, 990, (B, L)).astype(np.int32)
  rejected = rs.randint(0, 990, (B, L)).astype(np.int32)
  prompt = np.arange(L)[None] < PROMPT_LEN[:, None]
  rejected = np.where(prompt, chosen, rejected)  # one prompt, two answers
  return {"input_ids": jnp.asarray(chosen), "rejected_ids": jnp.asarray(rejected),
          "prompt_len": jnp.asarray(PROMPT_LEN)}


def _reference(model):
  """The fixture with every weight moved a little: a reference that differs."""
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  moved = [x + 0.05 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, moved))


def _numpy_elbos(model, noise, batch):
  """[B, A, N]: −(1/answer_len) Σ_masked CE / p_mask per sample, in float64 numpy."""
  ids_BAL = np.stack([np.asarray(batch["input_ids"]), np.asarray(batch["rejected_ids"])], 1)
  noisy = np.asarray(noise.noisy_BL)
  N = noisy.shape[2]
  logits = np.asarray(model(noisy.reshape(-1, L)), np.float64).reshape(B, 2, N, L, -1)
  m = logits.max(-1, keepdims=True)
  logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
  targets = np.broadcast_to(ids_BAL[:, :, None], (B, 2, N, L))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  terms = np.where(np.asarray(noise.masked_BL), ce / np.asarray(noise.p_mask_BL), 0.0)
  return -terms.sum(-1) / (L - PROMPT_LEN)[:, None, None]


@pytest.mark.parametrize("allocation, antithetic", [("optimal", True), ("optimal", False),
                                                    ("naive", True)])
def test_loss_and_metrics_equal_numpy_on_fixed_masks(tiny_model, allocation, antithetic):
  s = vrpo.Settings(n_samples=4, allocation=allocation, antithetic=antithetic, beta=0.5)
  batch, reference = _batch(), _reference(tiny_model)
  noise = vrpo.draw(jax.random.key(3), batch, tiny_model.config.mask_token_id, s)
  loss, metrics = jax.jit(lambda b, n: vrpo.loss(tiny_model, b, n, reference, s=s))(batch, noise)

  pol = _numpy_elbos(tiny_model, noise.policy, batch)
  ref = _numpy_elbos(reference, noise.reference or noise.policy, batch)
  ratio = pol.mean(-1) - ref.mean(-1)
  margin = s.beta * (ratio[:, 0] - ratio[:, 1])
  score = s.beta * ((pol - ref)[:, 0] - (pol - ref)[:, 1])
  want = {"reward_margin": margin.mean(), "preference_accuracy": (margin > 0).mean(),
          "elbo_policy_chosen": pol.mean(-1)[:, 0].mean(),
          "elbo_policy_rejected": pol.mean(-1)[:, 1].mean(),
          "elbo_reference_chosen": ref.mean(-1)[:, 0].mean(),
          "elbo_reference_rejected": ref.mean(-1)[:, 1].mean(),
          "score_variance": (score.var(-1, ddof=1) / 4).mean()}
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-margin)).mean(), rtol=1e-5)
  for k, v in want.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-7, err_msg=k)
  assert np.all(margin != 0)  # the reference differs
  assert (noise.reference is None) == antithetic

  masked = np.asarray(noise.policy.masked_BL)
  prompt = np.arange(L)[None, None, None] < PROMPT_LEN[:, None, None, None]
  assert not masked[np.broadcast_to(prompt, masked.shape)].any()
  assert masked.sum() > 0
  p_mask = np.asarray(noise.policy.p_mask_BL)[..., 0]  # [B, A, N]: one timestep per sample
  same_t = np.all(p_mask == p_mask[..., :1], axis=-1)
  assert same_t.all() if allocation == "naive" else not same_t.any()


@pytest.mark.parametrize("allocation", ["optimal", "naive"])
def test_antithetic_margin_is_exactly_zero_when_policy_is_reference(tiny_model, allocation):
  """Policy = reference (separate copies of the params, as in the train step): with
  shared noise every margin is 0.0 and every loss log 2, bit for bit, whatever the
  masks; with independent noise, not."""
  graphdef, params = nnx.split(tiny_model)
  copy = jax.tree.map(jnp.copy, params)
  batch = _batch()

  def terms(policy, reference, rng, s):
    noise = vrpo.draw(rng, batch, tiny_model.config.mask_token_id, s)
    elbos, _ = vrpo.pair_elbos(nnx.merge(graphdef, policy), nnx.merge(graphdef, reference),
                               batch, noise)
    return vrpo.preference_terms(elbos, s.beta)

  fn = jax.jit(terms, static_argnums=3)
  for n in ((1, 4) if allocation == "optimal" else (4,)):  # (n = 1: the same allocation)
    for seed in range(3):
      shared = fn(params, copy, jax.random.key(seed),
                  vrpo.Settings(n_samples=n, allocation=allocation, antithetic=True))
      assert np.all(np.asarray(shared["reward_margin"]) == 0.0)
      assert np.all(np.asarray(shared["loss"]) == np.float32(math.log(2)))
      independent = fn(params, copy, jax.random.key(seed),
                       vrpo.Settings(n_samples=n, allocation=allocation, antithetic=False))
      assert np.all(np.asarray(independent["reward_margin"]) != 0.0)


def _config(tmp_path, fixture_dir, **changes):
  cfg = tiny.get_config()
  rows = [{"prompt": f"question {i}", "chosen": f"a good answer {i}",
           "rejected": f"no {i % 3}"} for i in range(24)]
  source = tmp_path / "prefs.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg.update(kind="vrpo", init_from=fixture_dir, total_steps=4, batch_size=4, seq_len=24,
             log_every=1, eval_every=0, eval_batches=1, eval_batch_size=4, eval_samples=1,
             peak_flops=1e9)
  cfg.mesh.update(data=1, fsdp=4, tensor=2)
  cfg.data.update(source=str(source), eval_fraction=0.2, prefetch=0)
  cfg.optimizer.update(learning_rate=1e-3, warmup_steps=1, decay_steps=1)
  cfg.checkpoint.update(every_steps=2, keep=3)
  cfg.vrpo.update(n_samples=2)
  cfg.samples.num = 0
  cfg.update(changes)
  return cfg


def test_config_and_reference_checks(tmp_path, fixture_dir):
  for changes, why in ((dict(init_from=""), "config.init_from=''"),
                       (dict(reference_from=str(tmp_path / "nowhere")), "is not a directory")):
    with pytest.raises(ValueError, match=why):
      validate.check_config(_config(tmp_path, fixture_dir, **changes), 1, 8)
  for key, value, why in (("allocation", "both", "is not 'optimal'"),
                          ("beta", 0.0, "must be > 0"), ("n_samples", 0, "must be >= 1")):
    cfg = _config(tmp_path, fixture_dir)
    cfg.vrpo[key] = value
    with pytest.raises(ValueError, match=f"config.vrpo.{key}={value!r}: {why}"):
      validate.check_config(cfg, 1, 8)
  other = fixture_copy.copy_with_config(fixture_copy.pathlib.Path(fixture_dir),
                                        tmp_path / "other", rope_theta=5000.0)
  workdir = tmp_path / "wd"
  with pytest.raises(ValueError, match=r"reference_from=.*differs from the policy's .* "
                                       r"rope_theta \(500000.0 -> 5000.0\)"):
    train.train_and_evaluate(_config(tmp_path, fixture_dir, reference_from=other), str(workdir))
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def _rows(workdir):
  return {r["step"]: r for r in map(json.loads, open(workdir / "metrics.jsonl"))}


@pytest.mark.slow
def test_trainer_runs_vrpo_and_resumes_exactly(tmp_path, fixture_dir):
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(_config(tmp_path, fixture_dir), str(workdir))
  first = _rows(workdir)
  assert sorted(first) == [1, 2, 3, 4] and result["step"] == 4
  for row in first.values():
    assert set(vrpo.METRICS) <= set(row) and row["finite"] == 1, row
  # Step 1: policy = reference and shared noise. The policy's forward is compiled
  # under autodiff, the reference's is not: equal to rounding (1e-7), not bit for bit.
  assert abs(first[1]["loss"] - math.log(2)) < 1e-6 and abs(first[1]["reward_margin"]) < 1e-5
  assert first[4]["loss"] != first[1]["loss"]
  assert 0 <= result["eval_preference_accuracy"] <= 1 and "eval_vrpo_loss" in result
  # Resume from step 2 (the step-4 checkpoint gone): steps 3 and 4 again, bit for bit.
  shutil.rmtree(workdir / "checkpoints" / "4")
  train.train_and_evaluate(_config(tmp_path, fixture_dir), str(workdir))
  again = _rows(workdir)
  assert again[3] == first[3] and again[4] == first[4]
