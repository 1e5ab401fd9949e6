"""LLaDA2.x: parity with the released code on the fixture (full, block-causal and padded
attention, router), conversion, config mapping, and the block-diffusion sampler
(the official generate's tokens, an exact KV cache, batches, refused settings)."""

import json
import logging
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llada_jax
from fixture_copy import checkpoint_fixtures, copy_with_config, ling_like_tokenizer
from llada_jax import models
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import layout
from llada_jax.convert import hf_to_orbax, orbax_to_hf
from llada_jax.frontends import chat
from llada_jax.layers import moe as moe_lib
from llada_jax.sampling import sampler as sampling

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llada2_tiny"
MASK_ID, EOS_ID = 995, 992  # the fixture README's ids (config.json has pad = eos only)


ref, model = checkpoint_fixtures(FIXTURE, MASK_ID)


def _with_config(tmp_path, **changes) -> str:
  """A copy of the fixture whose config.json has `changes` (None deletes a key)."""
  return copy_with_config(FIXTURE, tmp_path / "llada2", **changes)


def test_config_maps_the_release_keys(model):
  cfg = model.config
  assert cfg.family == "llada2" and cfg.router == "sigmoid_grouped" and cfg.expert_bias
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 4, 4, 2)
  assert cfg.moe_layers == (0, 1, 1) and cfg.shared_expert_hidden_size == 32
  assert cfg.head_dim == 16 and cfg.rotary_dim == 8 and cfg.qk_norm
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (MASK_ID, EOS_ID, EOS_ID)
  with pytest.raises(ValueError, match="mask_token_id"):
    llada_jax.load(str(FIXTURE))


def test_mask_id_from_the_tokenizer_files_then_the_ling_default(tmp_path):
  path = pathlib.Path(_with_config(tmp_path))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "mask_token": "<|mask|>", "added_tokens_decoder": {"995": {"content": "<|mask|>"}}}))
  assert layout.read_config(str(path)).mask_token_id == MASK_ID
  from llada_jax.models import llada2  # pylint: disable=g-import-not-at-top
  hf = json.loads((FIXTURE / "config.json").read_text())
  assert llada2.config_from_hf({**hf, "vocab_size": 157184})["mask_token_id"] == 156895


def test_logits_match_the_released_code(model, ref):
  """Bidirectional without a mask, block-causal (block 8), and padded (real keys only)."""
  ids, mask = ref["input_ids"], ref["padded_attention_mask"]
  both = np.asarray(model(np.concatenate([ids, ref["padded_input_ids"]]),  # one compile
                          np.concatenate([np.ones_like(mask), mask])))
  np.testing.assert_allclose(both[:2], ref["logits"], atol=1e-4)  # all keys real = no mask
  real = mask.astype(bool)
  np.testing.assert_allclose(both[2:][real], ref["padded_logits_mask4d_bidirectional"][real],
                             atol=1e-4)
  np.testing.assert_allclose(model(ids, block_length=8), ref["blockcausal_logits"], atol=1e-4)
  assert np.array_equal(np.isfinite(ref["blockcausal_attention_mask"]),
                        np.tril(np.ones((3, 3), bool)).repeat(8, 0).repeat(8, 1))


def test_router_selects_the_reference_experts(model, ref):
  weights, ids = moe_lib.route(jnp.asarray(ref["router_logits_first_moe"]),
                               model.moe.expert_bias[...][0],
                               models.llada_moe.moe_config(model.config))
  np.testing.assert_array_equal(ids, ref["router_topk_ids_first_moe"])
  np.testing.assert_allclose(weights, ref["router_topk_weights_first_moe"], atol=1e-6)


def test_hf_orbax_hf_is_bit_identical(tmp_path):
  orbax_dir, hf_dir = str(tmp_path / "orbax"), str(tmp_path / "hf")
  hf_to_orbax.convert(_with_config(tmp_path, mask_token_id=MASK_ID), orbax_dir, progress=False)
  orbax_to_hf.convert(orbax_dir, hf_dir, progress=False)
  src, out = hf_checkpoint.open_reader(str(FIXTURE)), hf_checkpoint.open_reader(hf_dir)
  names = sorted(src.shapes)
  assert names == sorted(out.shapes) and "model.layers.2.attention.query_key_value.weight" in names
  for name in names:
    a, b = src.get(name), out.get(name)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert cfg["model_type"] == "llada2_moe" and cfg["first_k_dense_replace"] == 1
  assert cfg["num_shared_experts"] == 1 and cfg["head_dim"] == 16
  assert llada_jax.load(orbax_dir).config == llada_jax.load(hf_dir).config


@pytest.mark.parametrize("key, value", [("use_qkv_bias", True), ("hidden_act", "gelu"),
                                        ("norm_head", True), ("use_sliding_window", True),
                                        ("num_key_value_heads", 0)])
def test_unimplemented_settings_are_refused_by_name(tmp_path, key, value):
  with pytest.raises(ValueError, match=key):
    llada_jax.load(_with_config(tmp_path, **{key: value}), mask_token_id=MASK_ID)


def test_keys_the_release_ignores_only_warn(tmp_path, caplog, ref):
  path = _with_config(tmp_path, score_function="softmax", norm_topk_prob=False, rotary_dim=16,
                      moe_router_enable_expert_bias=False)
  with caplog.at_level(logging.WARNING):
    warned = llada_jax.load(path, mask_token_id=MASK_ID)
  for key in ("score_function", "norm_topk_prob", "rotary_dim", "moe_router_enable_expert_bias"):
    assert key in caplog.text, key
  np.testing.assert_allclose(warned(ref["input_ids"][:1]), ref["logits"][:1], atol=1e-4)


def test_init_and_param_table_agree(model):
  cfg = model.config.replace(moe_layers=(0, 0, 1), n_layers=3)
  shapes = {"/".join(map(str, k)): v.shape
            for k, v in nnx.to_flat_state(nnx.split(models.abstract(cfg))[1])}
  assert shapes == models.param_shapes(cfg)
  assert shapes["blocks/q_proj"] == (3, 64, 4, 16) and shapes["dense/ff_proj"] == (2, 64, 96)
  names = hf_checkpoint.expected_hf_shapes(cfg)
  assert names["model.layers.0.attention.query_key_value.weight"] == ((4 + 2 * 2) * 16, 64)
  assert "model.layers.2.mlp.experts.15.down_proj.weight" in names
  assert "model.layers.1.mlp.gate_proj.weight" in names  # layer 1 dense


# ------------------------------------------------------------------ block-diffusion generate
# The sampler is checked with the dense expert dispatch (it compiles faster; the logits
# parity above covers the default dispatch, and the tokens are the same with either).


@pytest.fixture(scope="module")
def sampler_model():
  return llada_jax.load(str(FIXTURE), mask_token_id=MASK_ID, moe_impl="dense")


def _left_padded(*prompts):
  """(ids [B, P] left-padded with EOS, attention_mask [B, P])."""
  width = max(len(p) for p in prompts)
  ids = np.stack([np.concatenate([np.full(width - len(p), EOS_ID), p]) for p in prompts])
  mask = (np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None])
  return ids, mask.astype(np.int32)


@pytest.fixture(scope="module")
def batch(ref):
  """Prompts A (5) and B (10) of the recorded cases and a random C (50), left-padded:
  the rows start and end in different blocks, and blocks 4, 5 are all prompt (C) or
  past the end (A, B), so no row decodes them."""
  return _left_padded(ref["gen_prompt_ids"][0], ref["gen_prompt_b_ids"][0],
                      np.random.default_rng(0).integers(0, 990, 50))


def test_generate_reproduces_the_official_tokens(sampler_model, ref, batch):
  """Every recorded case of the official generate (LLaDA2.0 and 2.1 rules, one compiled
  program); each row as the official code gives for that prompt alone."""
  ids, mask = batch
  base = dict(gen_length=16, block_length=8, steps=8, threshold=0.95)
  cases = [("gen0", {}), ("gen1", {"steps": 4}), ("gen2", {"threshold": 0.0}),
           ("gen3", {"editing_threshold": 0.9, "max_post_steps": 16, "num_to_transfer": 1}),
           ("gen4", {"editing_threshold": 0.0, "max_post_steps": 4, "num_to_transfer": 2})]
  for name, changes in cases:
    out, nfe = llada_jax.generate(sampler_model, ids, mask, return_nfe=True,
                                  **{**base, **changes})
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, :50], ids)
    np.testing.assert_array_equal(out[0, 50:], ref[name + "_output_ids"][0], err_msg=name)
    if name == "gen0":  # the settings of case 5 (prompt B)
      np.testing.assert_array_equal(out[1, 50:], ref["gen5_output_ids"][0])
      # 1 prefill + blocks 0..3 (A, B): 3 + 8 + 8 + 8, blocks 6..8 (C): 6 + 8 + 8
      assert nfe == 50, nfe


def test_block_cache_equals_recomputing_the_canvas(sampler_model, batch):
  """Token for token, sampling with LLaDA2.1 editing: the cached sampler and the one
  that runs the whole canvas every iteration under the same block-causal mask."""
  kw = dict(gen_length=16, block_length=8, editing_threshold=0.2, max_post_steps=3,
            temperature=0.8, rng=7, return_nfe=True)
  cached, nfe = llada_jax.generate(sampler_model, *batch, **kw)
  full, nfe_full = llada_jax.generate(sampler_model, *batch, kv_cache=False, **kw)
  np.testing.assert_array_equal(cached, full)
  assert nfe == nfe_full + 1  # + the prefill of the prompt blocks


def test_stream_yields_each_block_and_ends_with_generates_tokens(sampler_model, batch):
  """generate_stream: a canvas per decoded block (blocks 0..3 and 6..8 of the batch;
  4, 5 decode nothing), committed tokens never change, the last is generate's output."""
  kw = dict(gen_length=16, block_length=8, editing_threshold=0.5, max_post_steps=2,
            temperature=0.8, rng=3, return_nfe=True)
  want, nfe = llada_jax.generate(sampler_model, *batch, **kw)
  outs = list(sampling.generate_stream(sampler_model, *batch, **kw))
  assert len(outs) == 7 and outs[-1][1] == nfe
  np.testing.assert_array_equal(outs[-1][0], want)
  masks = [int((out == MASK_ID).sum()) for out, _ in outs]
  assert masks == sorted(masks, reverse=True) and masks[-1] == 0 < masks[-2]
  for out, _ in outs:
    np.testing.assert_array_equal(np.where(out == MASK_ID, want, out), want)


def test_stop_at_eos_skips_blocks_and_keeps_the_tokens(ref):
  """EOS := a token case 0 generates in block 1: output cut there (EOS after), and
  stop_at_eos skips block 2 (8 model calls) without changing any token."""
  eos = int(ref["gen0_output_ids"][0, 4])
  model = llada_jax.load(str(FIXTURE), mask_token_id=MASK_ID, eos_token_id=eos,
                         moe_impl="dense")
  kw = dict(gen_length=16, block_length=8, steps=8, return_nfe=True)
  full, nfe = llada_jax.generate(model, ref["gen_prompt_ids"], **kw)
  stopped, nfe_stopped = llada_jax.generate(model, ref["gen_prompt_ids"], stop_at_eos=True, **kw)
  want = np.where(np.arange(16) > 4, eos, ref["gen0_output_ids"][0])
  np.testing.assert_array_equal(np.asarray(full)[0, 5:], want)
  np.testing.assert_array_equal(stopped, full)
  assert (nfe, nfe_stopped) == (19, 11)  # the official call count; 3 + 8 with the stop


@pytest.mark.parametrize("changes, name", [
    ({"gen_length": 12}, "block_length"), ({"gen_length": 512}, "prompt_ids"),
    ({"cache": "dual"}, "cache"), ({"cache": "prefix"}, "cache"), ({"factor": 1.0}, "factor"),
    ({"cfg_scale": 1.0}, "cfg_scale"), ({"remasking": "random"}, "remasking"),
    ({"num_to_transfer": 2}, "num_to_transfer"), ({"threshold": -1.0}, "threshold"),
    ({"attention_mask": [[1, 0, 1, 1, 1]]}, "attention_mask"),
    ({"prompt_ids": [[5, MASK_ID, 7]]}, "prompt_ids")])
def test_bad_settings_are_refused_before_compiling(model, ref, changes, name):
  args = {"prompt_ids": ref["gen_prompt_ids"], "gen_length": 16, "block_length": 8, **changes}
  with chat.count_compiles() as compiles:
    for run in (llada_jax.generate, sampling.generate_stream):  # the stream: when called
      with pytest.raises(ValueError, match=name):
        run(model, **args)
  assert not compiles


def test_dense_models_refuse_block_settings():
  dense = models.abstract(llada_jax.ModelConfig(d_model=64, n_heads=4, n_kv_heads=4,
                                                n_layers=1, mlp_hidden_size=64))
  with pytest.raises(ValueError, match="editing_threshold"):
    llada_jax.generate(dense, [[1, 2, 3]], editing_threshold=0.5)


def test_llada2_chat_template(tmp_path):
  from llada_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(ling_like_tokenizer(tmp_path))
  assert tok.chat_format == "llada2" and tok.bos_id is None
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
              {"role": "assistant", "content": "Four."}, {"role": "user", "content": "What is it?"}]
  text = ("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
          "<role>HUMAN</role>Two plus two?<|role_end|><role>ASSISTANT</role>Four.<|role_end|>"
          "<role>HUMAN</role>What is it?<|role_end|><role>ASSISTANT</role>")
  ids = tok.apply_chat_template(messages)
  assert ids == tok.encode(text) and tok.decode(ids, skip_special=False) == text
  assert ids.count(tok.encode("<|role_end|>")[0]) == 4
  assert tok.decode(ids) == ("SYSTEMBe brief.\ndetailed thinking offHUMANTwo plus two?"
                             "ASSISTANTFour.HUMANWhat is it?ASSISTANT")  # markup tokens dropped
  assert tok.apply_chat_template(messages[1:2], add_generation_prompt=False, family="llada2") == (
      tok.encode("<role>SYSTEM</role>detailed thinking off<|role_end|>"
                 "<role>HUMAN</role>Two plus two?<|role_end|>"))
  with pytest.raises(ValueError, match="role 'tool'"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_splash_kernel_takes_the_block_causal_mask():
  """The TPU kernel's block-causal mask (run by its interpreter) = the XLA path's."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  from llada_jax.layers import attention, masks  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 128, n, 32)), jnp.float32) for n in (2, 1, 1))
  keys = np.ones((2, 128), np.int32)
  keys[1, :9] = 0  # left padding
  got = np.asarray(attention.splash_attention(q, k, v, keys, interpret=True, block_length=32))
  mask = masks.BlockCausal(32, jnp.asarray(keys))
  want = np.asarray(attention.xla_attention(q, k, v, mask.keep_BLS(128, 128)))
  np.testing.assert_allclose(got[keys == 1], want[keys == 1], atol=1e-5)
  assert np.array_equal(np.asarray(mask.keep_BLS(128, 128)[0]),
                        masks.block_causal_numpy(128, 32))
