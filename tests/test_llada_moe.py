"""LLaDA-MoE: parity with the released code on the fixture, conversion, the front-end
paths (generate, log_likelihood, training), expert sharding, and refused configs."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llada_jax
from fixture_copy import checkpoint_fixtures, copy_with_config
from llada_jax import sharding
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.convert import hf_to_orbax, orbax_to_hf
from llada_jax.training import objectives

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "lladamoe_tiny"
MASK_ID = 483  # the fixture README's mask id (the family's config.json has none)


ref, moe = checkpoint_fixtures(FIXTURE, MASK_ID)


def _with_config(tmp_path, **changes) -> str:
  """A copy of the fixture whose config.json has `changes` (None deletes a key)."""
  return copy_with_config(FIXTURE, tmp_path / "moe", **changes)


def test_config_is_told_apart_from_dense_by_its_keys(moe):
  cfg = moe.config
  assert cfg.family == "llada_moe" and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
  assert cfg.moe_layers == (1, 1) and cfg.qk_norm and cfg.expert_bias
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (MASK_ID, 480, 480)
  assert "mask_token_id" in str(pytest.raises(ValueError, llada_jax.load, str(FIXTURE)).value)


def test_logits_match_the_released_code(moe, ref):
  np.testing.assert_allclose(moe(ref["input_ids"]), ref["logits"], atol=1e-4)


def test_left_padding_is_honoured(moe, ref):
  """The release ignores the mask; with it, real positions keep the unpadded logits."""
  ids, mask = ref["padded_input_ids"], ref["padded_attention_mask"]
  logits = np.asarray(moe(ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(logits[real], ref["padded_logits_dllm_masked"][real], atol=1e-4)
  for b in range(ids.shape[0]):  # RoPE is relative: the shifted row sees what it saw unpadded
    n = int(real[b].sum())
    unpadded = np.asarray(moe(ids[b:b + 1, -n:]))[0]
    np.testing.assert_allclose(logits[b, -n:], unpadded, atol=1e-4)


def test_router_of_the_model_selects_the_reference_experts(moe, ref):
  from llada_jax.layers import moe as moe_lib  # pylint: disable=g-import-not-at-top
  h = ref["router_logits_first_moe"]
  bias = np.asarray(moe.moe.expert_bias[...][0])
  weights, ids = moe_lib.route_softmax_biased(jnp.asarray(h), jnp.asarray(bias), 2)
  np.testing.assert_array_equal(ids, ref["router_topk_ids_first_moe"])
  np.testing.assert_allclose(weights, ref["router_topk_weights_first_moe"], atol=1e-6)


def test_hf_orbax_hf_is_bit_identical(tmp_path):
  orbax_dir, hf_dir = str(tmp_path / "orbax"), str(tmp_path / "hf")
  hf_to_orbax.convert(_with_config(tmp_path, mask_token_id=MASK_ID), orbax_dir)
  orbax_to_hf.convert(orbax_dir, hf_dir)
  src, out = hf_checkpoint.open_reader(str(FIXTURE)), hf_checkpoint.open_reader(hf_dir)
  names = sorted(src.shapes)
  assert names == sorted(out.shapes) and any(".experts.7." in n for n in names)
  for name in names:
    a, b = src.get(name), out.get(name)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert cfg["num_experts"] == 8 and cfg["moe_layer_freq"] == [1, 1]
  assert llada_jax.load(orbax_dir).config == llada_jax.load(hf_dir).config


def test_generate_and_log_likelihood_run(moe):
  prompt = [[5, 17, 99, 3], [8, 8, 40, 2]]
  for kwargs in ({}, {"cache": "dual", "threshold": 0.9}, {"cache": "prefix"}):
    out = np.asarray(llada_jax.generate(moe, prompt, gen_length=8, steps=8, block_length=4,
                                        **kwargs))
    assert out.shape == (2, 12) and (out[:, 4:] != MASK_ID).all(), kwargs
  dual = np.asarray(llada_jax.generate(moe, prompt, gen_length=8, steps=8, block_length=4,
                                       cache="dual", cache_refresh=1))
  base = np.asarray(llada_jax.generate(moe, prompt, gen_length=8, steps=8, block_length=4))
  np.testing.assert_array_equal(dual, base)
  ll = llada_jax.log_likelihood(moe, [5, 17], [99, 3, 8], mc_num=8, batch_size=8)
  assert np.isfinite(ll) and ll < 0


def _loss(model, ids, rng):
  noise = objectives.pretrain_noise(rng, ids, MASK_ID)
  logits, aux = model.forward_with_aux(noise.noisy_BL, noise.attention_mask_BL)
  return objectives.masked_loss(logits, ids, noise), aux


def test_expert_sharded_mesh_equals_one_device(moe, ref, caplog):
  mesh = sharding.make_mesh((1, 2, 4, 1), sharding.EXPERT_MESH_AXES)  # fsdp 2 x expert 4
  sharded = llada_jax.load(str(FIXTURE), mask_token_id=MASK_ID, mesh=mesh)
  gate = sharded.moe.gate_proj[...]
  assert gate.sharding.spec[1] == "expert", gate.sharding  # [layers, experts, embed, mlp]
  ids = jnp.asarray(ref["input_ids"])
  np.testing.assert_allclose(sharded(ids), moe(ids), atol=1e-5)
  rng = jax.random.key(0)
  loss_one, aux_one = jax.jit(lambda m: _loss(m, ids, rng))(moe)
  loss_mesh, aux_mesh = jax.jit(lambda m: _loss(m, ids, rng))(sharded)
  np.testing.assert_allclose(loss_mesh, loss_one, rtol=1e-5)
  np.testing.assert_allclose(aux_mesh["load_balancing_loss"], aux_one["load_balancing_loss"],
                             rtol=1e-5)
  with caplog.at_level(logging.WARNING):  # 8 experts over an expert axis of 3: replicated
    odd = sharding.make_mesh((1, 2, 3, 1), sharding.EXPERT_MESH_AXES, jax.devices()[:6])
    llada_jax.load(str(FIXTURE), mask_token_id=MASK_ID, mesh=odd)
  assert any("experts" in r.getMessage() and "replicating" in r.getMessage()
             for r in caplog.records), caplog.text


@pytest.mark.parametrize("key, value", [("clip_qkv", 8.0), ("attention_bias", True),
                                        ("hidden_act", "gelu"), ("moe_layer_freq", [1])])
def test_unimplemented_settings_are_refused_by_name(tmp_path, key, value):
  with pytest.raises(ValueError, match=key):
    llada_jax.load(_with_config(tmp_path, **{key: value}), mask_token_id=MASK_ID)


def test_ignored_release_keys_only_warn(tmp_path, caplog):
  path = _with_config(tmp_path, norm_topk_prob=True, moe_router_score_function="sigmoid")
  with caplog.at_level(logging.WARNING):
    llada_jax.load(path, mask_token_id=MASK_ID)
  assert "norm_topk_prob" in caplog.text and "moe_router_score_function" in caplog.text


def test_a_missing_expert_tensor_is_named(tmp_path):
  path = pathlib.Path(_with_config(tmp_path))
  index = json.loads((path / "model.safetensors.index.json").read_text())
  name = "model.layers.1.mlp.experts.5.up_proj.weight"
  assert name in index["weight_map"]
  del index["weight_map"][name]
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    llada_jax.load(str(path), mask_token_id=MASK_ID)


def test_init_and_param_table_agree():
  cfg = llada_jax.load(str(FIXTURE), mask_token_id=MASK_ID).config.replace(
      moe_layers=(0, 1), shared_expert_hidden_size=16)
  from llada_jax import models  # pylint: disable=g-import-not-at-top
  model = models.init(cfg)
  shapes = {"/".join(map(str, k)): v.shape
            for k, v in nnx.to_flat_state(nnx.split(model)[1])}
  assert shapes == models.param_shapes(cfg)
  assert shapes["dense/ff_proj"] == (1, 64, 96) and shapes["moe/shared_gate"] == (1, 64, 16)
  names = hf_checkpoint.expected_hf_shapes(cfg)
  assert "model.layers.0.mlp.gate_proj.weight" in names  # layer 0 dense
  assert "model.layers.1.mlp.experts.3.down_proj.weight" in names  # layer 1 MoE
  assert "model.layers.1.shared_expert.up_proj.weight" in names
  logits, aux = model.forward_with_aux(jnp.zeros((1, 8), jnp.int32))
  assert logits.shape == (1, 8, 512) and set(aux) == {"load_balancing_loss", "router_z_loss"}


def test_rows_equal_the_full_forward_sliced(moe, ref):
  # The last (MoE) layer on 6 query rows only, as the dense sampler's steps run it.
  ids = ref["input_ids"]
  full = np.asarray(moe.forward_hidden(ids))
  np.testing.assert_allclose(moe.forward_hidden(ids, rows=(5, 6)), full[:, 5:11], atol=1e-5)


@pytest.mark.parametrize("layers", ["moe", "dense_then_moe"])
def test_unstacked_segments_give_the_same_forward(moe, ref, layers):
  # Per-layer weights (what a CPU sampler passes as `segments=`) compute what the
  # stacks do: the full forward, rows, and the cache of a windowed forward.
  if layers == "dense_then_moe":  # two runs of layers
    from llada_jax import models  # pylint: disable=g-import-not-at-top
    moe = models.init(moe.config.replace(moe_layers=(0, 1), shared_expert_hidden_size=16))
  ids = ref["input_ids"]
  per_layer = moe.unstacked_segments()
  assert [len(w) for _, w, _, _ in per_layer] == [n for _, _, _, n in moe.segments()]
  full, cache = moe.forward_with_cache(ids, head=False)
  got, got_cache = moe.forward_with_cache(ids, head=False, segments=per_layer)
  np.testing.assert_allclose(got, full, atol=1e-5)
  np.testing.assert_allclose(got_cache.k_YBSKH, cache.k_YBSKH, atol=1e-5)
  np.testing.assert_allclose(moe.forward_hidden(ids, rows=(5, 6), segments=per_layer),
                             full[:, 5:11], atol=1e-5)
  window, _ = moe.forward_window(ids[:, 4:8], 4, cache, head=False)
  got_window, _ = moe.forward_window(ids[:, 4:8], 4, cache, head=False, segments=per_layer)
  np.testing.assert_allclose(got_window, window, atol=1e-5)
