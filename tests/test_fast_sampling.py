"""Fast sampling: KV caches, threshold / factor decoding, stop_at_eos, NFE.

Exactness where theory gives it (full refreshes = baseline; threshold > 1 =
one token per step), a plain Python loop of each cache policy
(tests/reference_sampler.py), and leak
tests: padding, other rows of the batch and later blocks never reach a
committed token unless the baseline lets them.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import llada_jax
from llada_jax import sharding
from llada_jax.sampling import decoding
from llada_jax.sampling import kv_cache
from llada_jax.sampling import sampler as sampling
from reference_sampler import reference_generate


def _batch(model, rows=3, length=7, seed=0, pads=(0, 2, 4)):
  """Left-padded prompts of different lengths (row r has pads[r] pads)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, 980, (rows, length))
  attn = np.ones_like(prompt)
  for r, n in enumerate(pads[:rows]):
    attn[r, :n] = 0
  return np.where(attn == 1, prompt, model.config.eos_token_id), attn


@pytest.fixture(scope="module")
def confident_model(tiny_model):
  """The fixture with a sharpened head, so confidences spread over (0, 1] and the
  threshold / factor rules accept several tokens per step."""
  graphdef, state = nnx.split(tiny_model)
  state = jax.tree.map(lambda x: x, state)
  state["ff_out"].set_value(state["ff_out"][...] * 4.0)
  return nnx.merge(graphdef, state)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_baseline(tiny_model, mode):
  prompt, attn = _batch(tiny_model)
  args = dict(steps=8, gen_length=16, block_length=8, temperature=0.8, cfg_scale=0.5,
              constraints={1: 17, 10: 5})
  want = llada_jax.generate(tiny_model, prompt, attn, rng=3, **args)
  got, nfe = llada_jax.generate(tiny_model, prompt, attn, rng=3, cache=mode,
                                cache_refresh=1, return_nfe=True, **args)
  np.testing.assert_array_equal(got, want)
  assert nfe == args["steps"]


def test_threshold_above_one_equals_one_token_per_step(tiny_model):
  prompt, attn = _batch(tiny_model)
  args = dict(gen_length=16, block_length=8, temperature=0.7, cfg_scale=0.5,
              constraints={2: 9})
  want = llada_jax.generate(tiny_model, prompt, attn, steps=16, rng=5, **args)
  got, nfe = llada_jax.generate(tiny_model, prompt, attn, threshold=1.5, rng=5,
                                return_nfe=True, **args)
  np.testing.assert_array_equal(got, want)
  assert nfe == 16 - 1  # one constrained position needs no step


@pytest.mark.parametrize("mode, rule, blocks", [
    ("prefix", {}, 5), ("dual", {"threshold": 0.5}, 2), ("none", {"factor": 1.0}, 2)])
def test_cache_policies_equal_a_plain_loop(confident_model, mode, rule, blocks):
  # 5 blocks > kv_cache.MAX_PREFIX_WINDOWS: prefix windows are shared, padded ones.
  prompt, attn = _batch(confident_model, seed=1)
  args = dict(gen_length=10, block_length=10 // blocks, cfg_scale=0.5)
  steps = None if rule else 10
  want = reference_generate(confident_model, prompt, attn, cache=mode, steps=steps, **args,
                            **rule)
  got = llada_jax.generate(confident_model, prompt, attn, cache=mode, steps=steps or 10,
                           **args, **rule)
  np.testing.assert_array_equal(got, want)


def test_adaptive_rules_reveal_several_tokens_per_step(confident_model):
  prompt, attn = _batch(confident_model, seed=2)
  args = dict(gen_length=16, block_length=8, cfg_scale=0.5)
  _, nfe_thr = llada_jax.generate(confident_model, prompt, attn, threshold=0.5,
                                  return_nfe=True, **args)
  _, nfe_fac = llada_jax.generate(confident_model, prompt, attn, cache="dual",
                                  threshold=0.1, return_nfe=True, **args)
  assert 2 <= nfe_fac < nfe_thr < 16, (nfe_thr, nfe_fac)


@pytest.mark.parametrize("mode", [dict(cache="prefix", threshold=0.6),
                                  dict(cache="dual", steps=16), dict(cache="dual", factor=1.0)],
                         ids=lambda m: "-".join(map(str, m.values())))
def test_no_leaks_from_padding_other_rows_or_later_blocks(confident_model, mode):
  model = confident_model
  args = dict(gen_length=16, block_length=8, **mode)
  prompt, attn = _batch(model, seed=4)
  out = np.asarray(llada_jax.generate(model, prompt, attn, **args))
  # Padding is invisible: other ids at padded positions change nothing.
  noisy = np.where(attn == 1, prompt, 77)
  np.testing.assert_array_equal(np.asarray(llada_jax.generate(model, noisy, attn, **args))[:, 7:],
                                out[:, 7:])
  # Other rows are invisible, though they change how many steps the batch runs.
  others = np.where(np.arange(3)[:, None] == 0, prompt, prompt[:, ::-1] % 50)
  np.testing.assert_array_equal(
      np.asarray(llada_jax.generate(model, others, attn, **args))[0], out[0])
  # A block sees only the prompt, the blocks before it and masks: block 1 equals
  # the block generated after prompt + block 0 (no state crosses blocks).
  shorter = {**args, "gen_length": 8, **({"steps": 8} if "steps" in mode else {})}
  again = llada_jax.generate(model, out[:, :15], np.concatenate([attn, np.ones((3, 8), int)], 1),
                             **shorter)
  np.testing.assert_array_equal(np.asarray(again)[:, 15:], out[:, 15:])


def test_stop_at_eos_fills_remaining_blocks_without_the_model(tiny_model):
  graphdef, state = nnx.split(tiny_model)
  state = jax.tree.map(lambda x: x, state)
  eos = tiny_model.config.eos_token_id
  state["ff_out"].set_value(state["ff_out"][...].at[:, eos].multiply(6.0))
  model = nnx.merge(graphdef, state)
  prompt, attn = _batch(model, seed=6)
  args = dict(gen_length=24, block_length=4, cache="dual", threshold=0.9)
  full, nfe_full = llada_jax.generate(model, prompt, attn, return_nfe=True, **args)
  out, tr, nfe = llada_jax.generate(model, prompt, attn, stop_at_eos=True, trace=True,
                                    return_nfe=True, **args)
  gen_full, gen = np.asarray(full)[:, 7:], np.asarray(out)[:, 7:]
  has_eos = np.array([[(gen_full[r, :4 * (b + 1)] == eos).any() for b in range(6)]
                      for r in range(3)])
  stop = int(np.argmax(has_eos.all(0))) + 1  # blocks run
  assert stop < 6, "the boosted model should stop early"
  np.testing.assert_array_equal(gen[:, :4 * stop], gen_full[:, :4 * stop])
  assert (gen[:, 4 * stop:] == eos).all()
  assert nfe < nfe_full
  step = np.asarray(tr.step_BL)[:, 7:]
  assert step.max() == nfe - 1 and (step[:, 4 * stop:] == -1).all()
  # The stream ends with the block where every row stopped, its canvas filled with EOS.
  streamed = list(sampling.generate_stream(model, prompt, attn, stop_at_eos=True, **args))
  assert len(streamed) == stop
  np.testing.assert_array_equal(streamed[-1], out)


def test_trace_of_adaptive_steps(confident_model):
  prompt, attn = _batch(confident_model, seed=7)
  tokens, tr, nfe = llada_jax.generate(confident_model, prompt, attn, gen_length=16,
                                       block_length=8, cache="prefix", threshold=0.7,
                                       trace=True, return_nfe=True)
  canvas, step = np.asarray(tr.canvas_SBL), np.asarray(tr.step_BL)
  assert canvas.shape[0] == 16 and nfe < 16
  np.testing.assert_array_equal(canvas[nfe - 1:], np.broadcast_to(tokens, canvas[nfe - 1:].shape))
  gen_step = step[:, 7:]
  assert gen_step.min() >= 0 and gen_step.max() == nfe - 1
  for s in range(nfe):
    revealed = (canvas[s] != confident_model.config.mask_token_id)[:, 7:]
    np.testing.assert_array_equal(revealed, gen_step <= s)


def test_decoding_rules():
  conf = np.array([[0.95, 0.2, 0.8, 0.7, 0.1], [0.3, 0.2, 0.1, 0.05, 0.01]], np.float32)
  valid = np.array([[True, True, True, False, True], [True] * 5])
  np.testing.assert_array_equal(decoding.threshold_counts(conf, valid, 0.75), [2, 1])
  # factor 1: rank 2 needs >= 1 - 1/3, rank 3 >= 1 - 1/4, ...; ranks stop at the first miss.
  np.testing.assert_array_equal(decoding.factor_counts(conf, valid, 1.0), [2, 1])
  np.testing.assert_array_equal(decoding.factor_counts(conf, valid, 4.0), [3, 3])
  np.testing.assert_array_equal(decoding.factor_counts(conf, ~valid & valid, 1.0), [1, 1])
  assert kv_cache.prefix_groups(256, 32) == [(0, 2, 256), (2, 4, 192), (4, 6, 128), (6, 8, 64)]
  assert kv_cache.prefix_groups(256, 32, 8) == [(b, b + 1, 256 - 32 * b) for b in range(8)]
  assert kv_cache.prefix_groups(64, 4, 4) == [(0, 4, 64), (4, 8, 48), (8, 12, 32),
                                              (12, 16, 16)]


def test_topk_by_lax_top_k_equals_the_sort_and_noise_is_per_position():
  rng = np.random.default_rng(0)
  # Ties (values from a small set), -inf scores and invalid positions, k up to the bound.
  score = rng.choice(np.array([-np.inf, 0.0, 0.25, 0.5, 1.0], np.float32), (64, 12))
  valid = rng.random((64, 12)) < 0.6
  k = rng.integers(0, 4, 64)
  np.testing.assert_array_equal(decoding.topk_mask(score, k, valid, max_k=3),
                                decoding.topk_mask(score, k, valid))
  draw = lambda key: jax.random.uniform(key, (2,))
  key = jax.random.key(3)
  np.testing.assert_array_equal(decoding.position_noise(draw, key, 5, 4),
                                np.asarray(decoding.position_noise(draw, key, 0, 12))[:, 5:9])


def test_one_program_per_rule_and_invalid_settings(tiny_model):
  prompt = np.array([[5, 6, 7]])
  args = dict(steps=8, gen_length=8, block_length=4, cache="dual")
  llada_jax.generate(tiny_model, prompt, threshold=0.9, **args)
  before = sampling._sample_loop_jit._cache_size()  # pylint: disable=protected-access
  llada_jax.generate(tiny_model, prompt, threshold=0.3, **args)
  assert sampling._sample_loop_jit._cache_size() == before  # pylint: disable=protected-access
  for bad, name in ((dict(cache="kv"), "cache"), (dict(threshold=0.9, factor=1.), "factor"),
                    (dict(threshold=0.9, remasking="random"), "threshold"),
                    (dict(cache_refresh=0), "cache_refresh"), (dict(threshold=-1.), "threshold"),
                    (dict(factor=float("nan")), "factor"), (dict(stop_at_eos=1), "stop_at_eos")):
    with pytest.raises(ValueError, match=name):
      llada_jax.generate(tiny_model, prompt, **{**args, **bad})
  assert sampling._sample_loop_jit._cache_size() == before  # pylint: disable=protected-access


@pytest.mark.slow
def test_sharded_cache_gives_the_same_tokens_and_is_sharded(tiny_model, fixture_dir):
  # (data 4, tensor 2) of 8 fake devices: cache rows over data, the 2 kv heads over tensor.
  mesh = sharding.make_mesh((4, 1, 2))
  sharded = llada_jax.load(fixture_dir, mesh=mesh)
  prompt, attn = _batch(tiny_model, rows=4, pads=(0, 2, 4, 1))
  args = dict(steps=8, gen_length=16, block_length=8, cache="dual", cache_refresh=4)
  np.testing.assert_array_equal(llada_jax.generate(sharded, prompt, attn, **args),
                                llada_jax.generate(tiny_model, prompt, attn, **args))
  graphdef, state = nnx.split(sharded)
  ids = np.concatenate([prompt, np.full((4, 16), tiny_model.config.mask_token_id)], axis=1)
  mask = np.concatenate([attn, np.ones((4, 16), attn.dtype)], axis=1)

  def full_then_window(state, ids, mask):
    model = nnx.merge(graphdef, state)
    _, cache = model.forward_with_cache(ids, mask)
    return cache, model.forward_window(ids[:, 7:15], 7, cache, mask)[1]

  for cache in jax.jit(full_then_window)(state, ids, mask):
    Y, B, S, K, H = cache.k_YBSKH.shape
    for a in cache:
      assert a.sharding.shard_shape(a.shape) == (Y, B // 4, S, K // 2, H)
