"""Block-diffusion objectives and CAP: the [x_t ; x_0] mask against its definition,
the loss against a direct numpy computation, complementary masking, the
embedding-noise hook, and short block_sft runs of the trainer on both fixtures."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llada_jax
from llada_jax.layers.masks import BlockCausal, BlockDiffusion
from llada_jax.training import block_objectives, objectives, train
from tests import fixture_copy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


@pytest.fixture(scope="module", params=["llada_tiny", "llada2_tiny"])
def model(request):
  extra = {"mask_token_id": 995} if request.param == "llada2_tiny" else {}
  return llada_jax.load(os.path.join(FIXTURES, request.param), dtype="float32", **extra)


def test_mask_equals_the_definition_for_L8_block2():
  L, bl = 8, 2
  want = np.zeros((2 * L, 2 * L), bool)
  for q in range(2 * L):
    for k in range(2 * L):
      q_clean, k_clean = q >= L, k >= L
      qb, kb = (q % L) // bl, (k % L) // bl
      if not q_clean and not k_clean:
        want[q, k] = qb == kb  # a noisy block sees itself
      elif not q_clean and k_clean:
        want[q, k] = kb < qb  # and the clean blocks before it
      elif q_clean and k_clean:
        want[q, k] = kb <= qb  # clean blocks: block-causal
  got = np.asarray(BlockDiffusion(bl).keep_BLS(2 * L, 2 * L))[0]
  np.testing.assert_array_equal(got, want)
  assert want[:L, L:].sum() == sum(2 * 2 * b for b in range(4))  # sanity of the loops


def _ce_np(logits, targets):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def test_block_sft_loss_equals_numpy_on_fixed_masks(model):
  """The 2L forward's loss = Σ_rows 1/(B·answer_len) Σ_b Σ_masked CE / p_b, where
  block b's logits come from a block-causal forward of [x_0 blocks < b ; x_t block b]
  (the context the block sampler gives it)."""
  B, L, bl = 2, 16, 4
  ids = np.asarray(jax.random.randint(jax.random.key(0), (B, L), 5, 900))
  prompt_len = np.array([3, 6])
  s = block_objectives.BlockSettings(bl)
  o = train.LossOptions(model.config.mask_token_id, model.config.d_model, block=s)
  inputs = train._block_noise(jax.random.key(1), {"input_ids": jnp.asarray(ids),
                                                   "prompt_len": jnp.asarray(prompt_len)}, 0, o)
  noisy, masked = np.asarray(inputs.noise.noisy_BL), np.asarray(inputs.noise.masked_BL)
  p = np.asarray(inputs.noise.p_mask_BL)
  assert not masked[0, :3].any() and not masked[1, :6].any() and masked.any()
  assert (noisy == np.where(masked, model.config.mask_token_id, ids)).all()
  assert (p.reshape(B, L // bl, bl) == p[:, ::bl, None]).all()  # one level per block
  assert len(np.unique(p)) == B * L // bl and p.min() >= objectives.EPS

  graphdef, state = nnx.split(model)
  # Block-causal: positions up to block b do not see what follows, so one length-L
  # forward per block gives block b its context.
  forward = jax.jit(lambda st, x: nnx.merge(graphdef, st).forward(x, BlockCausal(bl)))
  want = 0.0
  for b in range(L // bl):
    lo, hi = b * bl, (b + 1) * bl
    x = np.concatenate([ids[:, :lo], noisy[:, lo:hi], ids[:, hi:]], axis=1)
    ce = _ce_np(np.asarray(forward(state, jnp.asarray(x)))[:, lo:hi], ids[:, lo:hi])
    for r in range(B):
      m = masked[r, lo:hi]
      want += (ce[r][m] / p[r, lo:hi][m]).sum() / (B * (L - prompt_len[r]))
  got, aux = jax.jit(lambda st: train._block_loss(nnx.merge(graphdef, st), None, inputs, None,
                                                  options=o, micro_batches=1))(state)
  aux.pop("masked_tokens")
  router = objectives.router_penalty(model.config, aux)  # MoE: the router losses the trainer adds
  np.testing.assert_allclose(float(got - router), want, rtol=2e-5)


def test_complementary_masking_masks_each_position_exactly_once_per_pair():
  B, L, bl = 3, 12, 4
  ids = jax.random.randint(jax.random.key(0), (B, L), 5, 900)
  prompt_len = jnp.array([0, 2, 5])
  s = block_objectives.BlockSettings(bl, t_min=0.2, t_max=0.6, complementary=True)
  targets, noise = block_objectives.block_noise(jax.random.key(3), ids, 999, s, prompt_len)
  targets, masked = np.asarray(targets), np.asarray(noise.masked_BL)
  p, w = np.asarray(noise.p_mask_BL), np.asarray(noise.weight_BL)
  assert targets.shape == (2 * B, L)
  np.testing.assert_array_equal(targets[0::2], np.asarray(ids))
  np.testing.assert_array_equal(targets[1::2], np.asarray(ids))
  trainable = np.arange(L)[None] >= np.asarray(prompt_len)[:, None]
  np.testing.assert_array_equal(masked[0::2].astype(int) + masked[1::2], trainable.astype(int))
  np.testing.assert_allclose(p[0::2] + p[1::2], 1.0, atol=1e-6)
  eps = objectives.EPS
  assert (p[0::2] >= eps + (1 - 2 * eps) * 0.2 - 1e-6).all()  # the bandwidth
  assert (p[0::2] <= eps + (1 - 2 * eps) * 0.6 + 1e-6).all()
  np.testing.assert_allclose(w[:, 0], np.repeat(1 / (2 * B * (L - np.asarray(prompt_len))), 2),
                             rtol=1e-6)


def test_block_pretrain_crop_is_on_a_block_boundary_and_renormalised():
  """crop_prob=1: every batch is cut to K·block_length tokens (K varies with the
  key), nothing past it is masked, and the kept tokens weigh 1/(B·kept); 0: no crop."""
  B, L, bl = 2, 16, 4
  ids = jax.random.randint(jax.random.key(0), (B, L), 5, 900)
  lengths = set()
  for seed in range(12):
    s = block_objectives.BlockSettings(bl, t_min=0.99, t_max=1.0, crop_prob=1.0)
    _, noise = block_objectives.block_noise(jax.random.key(seed), ids, 999, s)
    masked, w = np.asarray(noise.masked_BL), np.asarray(noise.weight_BL)
    kept = int(np.round(1 / (B * w[0, 0])))
    assert kept % bl == 0 and 0 < kept <= L
    assert masked[:, :kept].all() and not masked[:, kept:].any()  # t ≈ 1: all kept masked
    lengths.add(kept)
  assert len(lengths) > 1
  _, noise = block_objectives.block_noise(jax.random.key(0), ids, 999, block_objectives.
                                          BlockSettings(bl, t_min=0.99, t_max=1.0))
  assert np.asarray(noise.masked_BL).all()
  np.testing.assert_allclose(np.asarray(noise.weight_BL), 1 / (B * L), rtol=1e-6)


def test_cap_entropy_equals_numpy():
  rs = np.random.RandomState(0)
  logits = rs.randn(2, 6, 11).astype(np.float32) * 3
  targets = rs.randint(0, 11, (2, 6))
  targets[:, :3] = logits.argmax(-1)[:, :3]  # half predicted correctly
  masked = rs.rand(2, 6) < 0.7
  weight = np.broadcast_to(np.array([[0.1], [0.25]], np.float32), (2, 6))
  noise = objectives.Noise(jnp.zeros((2, 6), jnp.int32), jnp.asarray(masked),
                           jnp.ones((2, 6)), jnp.asarray(weight), jnp.ones((2, 6), jnp.int32))
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  entropy = -(prob * np.log(prob)).sum(-1)
  keep = masked & (logits.argmax(-1) == targets)
  assert 0 < keep.sum() < masked.sum()
  want = (entropy * weight)[keep].sum()
  got = objectives.cap_entropy(jnp.asarray(logits), jnp.asarray(targets), noise)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_embedding_noise_hook_and_schedule(tiny_model):
  """embed_noise_BLD is added to the embeddings: adding wte[a] − wte[b] at a
  position holding b is the forward of a there; the noise stops after its steps."""
  ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
  wte = tiny_model.wte[...]
  delta = jnp.zeros((1, 6, wte.shape[1])).at[0, 2].set(wte[42] - wte[7])
  graphdef, state = nnx.split(tiny_model)
  forward = jax.jit(lambda st, x, d: nnx.merge(graphdef, st).forward_with_aux(
      x, embed_noise_BLD=d)[0])
  got = forward(state, ids, delta)
  want = forward(state, ids.at[0, 2].set(42), jnp.zeros_like(delta))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)

  s = block_objectives.BlockSettings(2, embed_noise_std=0.5, embed_noise_steps=10)
  ids = jax.random.randint(jax.random.key(0), (4, 8), 5, 900)
  on = block_objectives.block_inputs(jax.random.key(1), ids, 996, s, 16, step=9)
  off = block_objectives.block_inputs(jax.random.key(1), ids, 996, s, 16, step=10)
  masked = np.asarray(on.noise.masked_BL)
  noise = np.asarray(on.embed_noise_BLD)
  assert (noise[~masked] == 0).all() and (noise[masked] != 0).all()
  assert 0.4 < noise[masked].std() < 0.6
  assert not np.asarray(off.embed_noise_BLD).any()
  plain = block_objectives.block_inputs(jax.random.key(1), ids, 996,
                                        block_objectives.BlockSettings(2), 16)
  assert plain.embed_noise_BLD is None


# ---- the trainer ---------------------------------------------------------------------

def _sft_data(path, n=60):
  rs = np.random.RandomState(0)
  with open(path, "w") as f:
    for _ in range(n):
      a, b = rs.randint(0, 50, 2)
      f.write(json.dumps({"prompt": f"add {a} {b}", "response": f"{a + b}"}) + "\n")
  return str(path)


def _block_sft(data, **extra):
  """The settings of a 3-step block_sft run with every option on: {config key: value}."""
  return {"kind": "block_sft", "block_length": 8, "seq_len": 32, "batch_size": 8,
          "total_steps": 3, "log_every": 1, "eval_every": 0, "eval_batches": 1,
          "eval_batch_size": 8, "eval_samples": 1, "peak_flops": 1e9, "data.source": data,
          "data.eval_fraction": 0.2, "optimizer.warmup_steps": 1, "optimizer.decay_steps": 1,
          "checkpoint.every_steps": 3, "samples.num": 0, "complementary_masking": True,
          "cap_weight": 0.5, "embed_noise_std": 0.1, "embed_noise_steps": 2, **extra}


@pytest.mark.slow
def test_block_sft_trainer_run_on_the_dense_fixture_from_the_cli(tmp_path):
  data = _sft_data(tmp_path / "sft.jsonl")
  flags = [f"--config.{k}={v}" for k, v in _block_sft(
      data, init_from=f"{FIXTURES}/llada_tiny").items()]
  cmd = [sys.executable, "-m", "llada_jax.train", f"--config={REPO}/configs/tiny.py",
         f"--workdir={tmp_path / 'run'}", *flags]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["cap_entropy"] >= 0 for r in rows), rows
  assert all(r["masked_tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_block_sft_trainer_run_on_the_llada2_fixture(tmp_path, capsys):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  src = fixture_copy.copy_with_config(  # with the ids of the dense fixture's tokenizer
      pathlib.Path(FIXTURES) / "llada2_tiny", tmp_path / "llada2", mask_token_id=996,
      eos_token_id=990, pad_token_id=990)
  cfg = tiny.get_config()
  for key, value in _block_sft(_sft_data(tmp_path / "sft.jsonl"), init_from=src,
                               **{"tokenizer.path": f"{FIXTURES}/llada_tiny"}).items():
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    node[leaf] = value
  result = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert result["step"] == 3 and np.isfinite(result["loss"]), result
  assert np.isfinite(result["eval_elbo_bits_per_token"])
  assert "load_balancing_loss" in capsys.readouterr().out
  assert llada_jax.load(str(tmp_path / "run")).config.family == "llada2"
