"""generate: parity with the PyTorch reference, with a plain Python loop of SPEC §3
(tests/reference_sampler.py), temperature sampling, options, validation, caching,
sharded runs, and generate_stream."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llada_jax
from llada_jax import sharding
from llada_jax.sampling import sampler as sampling
from reference_sampler import reference_generate

CASE_ARGS = ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking",
             "logits_eos_inf")


def _cases(fixture_dir):
  with open(os.path.join(fixture_dir, "reference.json")) as f:
    return json.load(f)["generate_cases"]


@pytest.fixture(scope="module")
def eos_heavy_model(tiny_model):
  """The fixture with EOS and EoT made likely, so the EOS options visibly matter."""
  graphdef, state = nnx.split(tiny_model)
  state = jax.tree.map(lambda x: x, state)
  cfg = tiny_model.config
  head = state["ff_out"][...]
  head = head.at[:, cfg.eos_token_id].multiply(6.0).at[:, cfg.eot_token_id].multiply(6.0)
  state["ff_out"].set_value(head)
  return nnx.merge(graphdef, state)


def test_matches_the_pytorch_reference_token_for_token(tiny_model, reference, fixture_dir):
  for case in _cases(fixture_dir):
    i = case["index"]
    out = llada_jax.generate(tiny_model, reference[f"gen{i}_prompt"],
                             reference.get(f"gen{i}_attention_mask"),
                             **{k: case[k] for k in CASE_ARGS})
    np.testing.assert_array_equal(out, reference[f"gen{i}_output"], err_msg=f"case {i}")


@pytest.mark.parametrize("settings", [
    dict(steps=6, gen_length=12, block_length=4, padded=True, confidence_eos_eot_inf=True),
    dict(steps=5, gen_length=15, block_length=15, cfg_scale=1.0, padded=False),
    dict(steps=8, gen_length=16, block_length=8, remasking="random", temperature=0.5,
         padded=True, logits_eos_inf=True, constraints={0: 5, 9: 17}),
    dict(steps=4, gen_length=10, block_length=5, cfg_scale=0.5, padded=True,
         temperature=2.0),
])
def test_equals_a_plain_python_loop(tiny_model, eos_heavy_model, settings):
  settings = dict(settings)
  # The EOS options need a model that produces EOS; others use the fixture as is
  # (boosting EOS saturates probabilities at 1.0 and makes exact ties).
  eos_options = settings.get("logits_eos_inf") or settings.get("confidence_eos_eot_inf")
  model = eos_heavy_model if eos_options else tiny_model
  rng = np.random.default_rng(settings["steps"])
  padded = settings.pop("padded")
  prompt = rng.integers(0, 980, (3, 7))
  attn = None
  if padded:
    attn = np.ones_like(prompt)
    attn[1, :2] = attn[2, :4] = 0
    prompt = np.where(attn == 1, prompt, model.config.eos_token_id)
  key = jax.random.key(int(rng.integers(1 << 30)))
  want = reference_generate(model, prompt, attn, rng=key, **settings)
  got = llada_jax.generate(model, prompt, attn, rng=key, **settings)
  np.testing.assert_array_equal(got, want)


def test_temperature_sampling_matches_softmax(tiny_model):
  """One-token generations at T=2 follow softmax(logits / 2): chi-square at a fixed seed."""
  cfg = tiny_model.config
  prompt = np.array([5, 77, 300, 12, 640])
  n = 4000
  out = llada_jax.generate(tiny_model, np.tile(prompt, (n, 1)), steps=1, gen_length=1,
                           block_length=1, temperature=2.0, rng=jax.random.key(7))
  tokens = np.asarray(out)[:, -1]
  logits = np.asarray(tiny_model(np.append(prompt, cfg.mask_token_id)[None]))[0, -1]
  probs = np.asarray(jax.nn.softmax(logits / 2.0), np.float64)
  expected = n * probs
  counts = np.bincount(tokens, minlength=cfg.embedding_size).astype(np.float64)
  big = expected >= 5  # pool the rare tokens into one bin
  assert big.sum() >= 50
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  chi2 = ((obs - exp) ** 2 / exp).sum()
  dof = len(obs) - 1
  p_value = float(jax.scipy.special.gammaincc(dof / 2, chi2 / 2))
  assert p_value > 1e-3, (chi2, dof)
  # Greedy decoding would put everything on the argmax: the test can tell.
  assert counts.max() < 0.5 * n


def test_eos_options(eos_heavy_model):
  cfg = eos_heavy_model.config
  stops = [cfg.eos_token_id, cfg.eot_token_id]
  prompt = np.random.default_rng(0).integers(0, 980, (8, 6))
  args = dict(steps=8, gen_length=16, block_length=8, trace=True)

  def stop_reveal_steps(**options):
    tokens, tr = llada_jax.generate(eos_heavy_model, prompt, **args, **options)
    gen, step = np.asarray(tokens)[:, 6:], np.asarray(tr.step_BL)[:, 6:]
    return gen, step[np.isin(gen, stops)] % 4  # step within its block

  gen, plain = stop_reveal_steps()
  assert len(plain) >= 16  # the boosted model does produce EOS / EoT
  gen, _ = stop_reveal_steps(logits_eos_inf=True)
  assert not (gen == cfg.eos_token_id).any()
  _, deferred = stop_reveal_steps(confidence_eos_eot_inf=True)
  # Stop tokens wait until a step has nothing else to reveal: on average much later.
  assert deferred.mean() > plain.mean() + 0.5, (deferred.mean(), plain.mean())


def test_trace_records_every_step(tiny_model, reference):
  prompt, attn = reference["gen3_prompt"], reference["gen3_attention_mask"]
  tokens, tr = llada_jax.generate(tiny_model, prompt, attn, trace=True, steps=12,
                                  gen_length=12, block_length=4)
  np.testing.assert_array_equal(tokens, reference["gen3_output"])
  canvas = np.asarray(tr.canvas_SBL)
  assert canvas.shape == (12,) + tokens.shape
  np.testing.assert_array_equal(canvas[-1], tokens)
  mask_id = tiny_model.config.mask_token_id
  step, conf = np.asarray(tr.step_BL), np.asarray(tr.confidence_BL)
  assert (step[:, :10] == -1).all() and np.isnan(conf[:, :10]).all()
  for s in range(12):  # one token per step
    np.testing.assert_array_equal((step == s).sum(1), 1)
    shown = (step >= 0) & (step <= s)
    np.testing.assert_array_equal(canvas[s][shown], np.asarray(tokens)[shown])
    assert (canvas[s][step > s] == mask_id).all()
  assert ((conf[:, 10:] > 0) & (conf[:, 10:] <= 1)).all()


@pytest.mark.parametrize("args", [dict(steps=6, temperature=0.5, cfg_scale=0.5),
                                  dict(cache="dual", threshold=0.3)], ids=["none-fixed",
                                                                           "dual-threshold"])
def test_stream_yields_each_block_and_ends_with_generates_tokens(tiny_model, reference, args):
  prompt, attn = reference["gen3_prompt"], reference["gen3_attention_mask"]  # padded rows
  args = dict(gen_length=12, block_length=4, rng=9, **args)
  want, nfe = llada_jax.generate(tiny_model, prompt, attn, return_nfe=True, **args)
  canvases = list(sampling.generate_stream(tiny_model, prompt, attn, **args))
  assert len(canvases) == 3
  np.testing.assert_array_equal(canvases[-1], want)
  mask_id = tiny_model.config.mask_token_id
  for b, canvas in enumerate(canvases):  # blocks <= b final, the rest still masked
    assert isinstance(canvas, np.ndarray)
    done = prompt.shape[1] + 4 * (b + 1)
    np.testing.assert_array_equal(canvas[:, :done], np.asarray(want)[:, :done])
    assert (canvas[:, done:] == mask_id).all()
  *_, (last, last_nfe) = sampling.generate_stream(tiny_model, prompt[0], attn[0],
                                                  return_nfe=True, **args)
  np.testing.assert_array_equal(last, np.asarray(want)[0])
  assert last.ndim == 1 and 0 < last_nfe <= 12 and ("threshold" in args or last_nfe == nfe)
  with pytest.raises(ValueError, match="block_length"):  # checked when called
    sampling.generate_stream(tiny_model, prompt, **{**args, "block_length": 5})


def test_one_dimensional_prompt_and_compile_cache(tiny_model, reference):
  prompt = reference["gen0_prompt"][1]
  args = dict(steps=4, gen_length=8, block_length=8, temperature=0.7)
  out = llada_jax.generate(tiny_model, prompt, **args)
  assert out.shape == (18,)
  np.testing.assert_array_equal(out[:10], prompt)
  before = sampling._sample_loop_jit._cache_size()  # pylint: disable=protected-access
  # Another temperature, seed and prompt of the same shape: no new compile.
  llada_jax.generate(tiny_model, prompt[::-1], **{**args, "temperature": 1.3}, rng=5)
  assert sampling._sample_loop_jit._cache_size() == before  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs, name", [
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(gen_length=12, block_length=4, steps=4), "steps"),
    (dict(gen_length=8, block_length=8, steps=16), "steps"),
    (dict(gen_length=600, block_length=600, steps=600), "gen_length"),
    (dict(remasking="top_p"), "remasking"),
    (dict(temperature=-1.0), "temperature"),
    (dict(steps=0), "steps"),
    (dict(prompt=[[1, 2, 1024]]), "prompt_ids"),
    (dict(prompt=[[1, 2, -1]]), "prompt_ids"),
    (dict(attention_mask=[[1, 1]]), "attention_mask"),
    (dict(attention_mask=[[0, 2, 1]]), "attention_mask"),
    (dict(constraints={8: 3}), "constraints"),
    (dict(constraints={0: 5000}), "constraints"),
])
def test_invalid_settings_raise_before_compiling(tiny_model, kwargs, name):
  kwargs = {"steps": 4, "gen_length": 8, "block_length": 8, **kwargs}
  prompt = kwargs.pop("prompt", [[1, 2, 3]])
  before = sampling._sample_loop_jit._cache_size()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=name):
    llada_jax.generate(tiny_model, prompt, **kwargs)
  assert sampling._sample_loop_jit._cache_size() == before  # pylint: disable=protected-access


def test_sharded_model_gives_the_same_tokens(tiny_model, fixture_dir, reference):
  mesh = sharding.make_mesh((2, 2, 2))
  sharded = llada_jax.load(fixture_dir, mesh=mesh)
  assert sharded.blocks.q_proj[...].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None)
  prompt = np.concatenate([reference["gen4_prompt"], reference["gen3_prompt"][:1]])
  attn = np.concatenate([reference["gen4_attention_mask"], np.ones((1, 10), np.int64)])
  args = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, temperature=0.5)
  out = llada_jax.generate(sharded, prompt, attn, **args)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(out, llada_jax.generate(tiny_model, prompt, attn, **args))
