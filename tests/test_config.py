"""ModelConfig: HF config.json in and out, refusals, special ids."""

import json
import re
import pathlib
import shutil

import pytest

from configs import llada_8b, tiny
from llada_jax.config import ModelConfig, config_from_model_dir

REFERENCE_8B = pathlib.Path(__file__).parent / "fixtures" / "llada_8b_instruct" / "config.json"


def _released_8b_config():
  # The released LLaDA-8B-Instruct values SPEC §1 lists (the verbatim file is REFERENCE_8B).
  cfg = ModelConfig.from_dict(llada_8b.model_config()).to_hf(torch_dtype="bfloat16")
  return cfg


def test_8b_config_has_the_released_values_and_size():
  cfg = ModelConfig.from_dict(llada_8b.model_config())
  assert cfg.num_params() == 8_015_581_184
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.mlp_hidden_size) == (
      4096, 32, 32, 32, 12288)
  assert cfg.vocab_size == cfg.embedding_size == 126464
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.eot_token_id) == (
      126336, 126081, 126080, 126348)


def test_hf_round_trip_keeps_every_model_field():
  cfg = ModelConfig.from_dict(llada_8b.model_config())
  back = ModelConfig.from_hf(cfg.to_hf(), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             remat_policy=cfg.remat_policy)
  assert back == cfg


def test_released_config_without_bos_eot_gets_llada_defaults():
  hf = _released_8b_config()
  del hf["bos_token_id"], hf["eot_token_id"]
  cfg = ModelConfig.from_hf(hf)
  assert (cfg.bos_token_id, cfg.eot_token_id) == (126080, 126348)


def test_fixture_ids_come_from_config_then_tokenizer(fixture_dir, tmp_path):
  cfg = config_from_model_dir(fixture_dir)
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id,
          cfg.eot_token_id) == (996, 990, 990, 989, 999)
  # Without bos in config.json, the tokenizer files provide it; never LLaDA's 126080.
  model_dir = tmp_path / "m"
  shutil.copytree(fixture_dir, model_dir)
  hf = json.loads((model_dir / "config.json").read_text())
  del hf["bos_token_id"]
  (model_dir / "config.json").write_text(json.dumps(hf))
  assert config_from_model_dir(str(model_dir)).bos_token_id == 989


def test_other_vocabulary_gets_no_llada_defaults():
  hf = _released_8b_config()
  hf.update(vocab_size=1000, embedding_size=1024, mask_token_id=5, eos_token_id=6,
            pad_token_id=6)
  del hf["bos_token_id"], hf["eot_token_id"]
  cfg = ModelConfig.from_hf(hf)
  assert cfg.bos_token_id is None and cfg.eot_token_id is None
  del hf["mask_token_id"]
  with pytest.raises(ValueError, match="mask_token_id"):
    ModelConfig.from_hf(hf)


def test_non_llada_model_type_is_refused():
  hf = _released_8b_config()
  hf["model_type"] = "llama"
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig.from_hf(hf)


@pytest.mark.parametrize("key,value", [
    ("alibi", True), ("include_bias", True), ("include_qkv_bias", True),
    ("bias_for_layer_norm", True), ("block_type", "sequential"), ("layer_norm_type", "default"),
    ("attention_layer_norm", True), ("rope", False), ("activation_type", "gelu"),
    ("input_emb_norm", True), ("block_group_size", 2), ("clip_qkv", 8.0),
    ("multi_query_attention", True),
])
def test_unsupported_features_are_refused_by_key(key, value):
  hf = _released_8b_config()
  hf[key] = value
  with pytest.raises(ValueError, match=key):
    ModelConfig.from_hf(hf)


def test_released_config_file_round_trips():
  hf = json.loads(REFERENCE_8B.read_text())
  cfg = ModelConfig.from_hf(hf)
  assert cfg.num_params() == 8_015_581_184
  out = cfg.to_hf(torch_dtype="bfloat16")
  # Every key of the released file comes back with its value (ids it lacks are added).
  for key, value in hf.items():
    if key not in ("_name_or_path",):
      assert out[key] == value, key
  assert set(out) - set(hf) == {"bos_token_id", "eot_token_id"}


@pytest.mark.parametrize("bad,match", [
    (dict(n_heads=5), "d_model"), (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(embedding_size=10), "embedding_size"), (dict(dtype="float16"), "dtype"),
    (dict(mask_token_id=5000), "mask_token_id"), (dict(attention="flash"), "attention"),
])
def test_invalid_values_name_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_dict({**tiny.model_config().to_dict(), **bad})


def test_unknown_config_keys_are_refused():
  with pytest.raises(ValueError, match="n_experts"):
    ModelConfig.from_dict({**tiny.model_config().to_dict(), "n_experts": 8})


@pytest.mark.parametrize("edit,needle", [
    ({"d_model": "64"}, "d_model: expected a positive integer, got '64'"),
    ({"n_layers": 2.0}, "n_layers: expected a positive integer, got 2.0"),
    ({"n_layers": -1}, "n_layers: expected a positive integer, got -1"),
    ({"n_heads": [4]}, "n_heads: expected a positive integer, got [4]"),
    ({"max_sequence_length": 0}, "max_sequence_length: expected a positive integer, got 0"),
    ({"rope_theta": "big"}, "rope_theta: expected a finite number > 0, got 'big'"),
    ({"weight_tying": "no"}, "weight_tying: expected true or false, got 'no'"),
    ({"mlp_ratio": 1.5, "mlp_hidden_size": None}, "mlp_ratio: expected a positive integer, got 1.5"),
    ({"eos_token_id": "2"}, "eos_token_id: expected a token id (integer), got '2'"),
])
def test_bad_config_json_values_name_the_file_and_key(fixture_dir, tmp_path, edit, needle):
  """Case 7 of issue 17: each refusal names DIR/config.json and the key."""
  from llada_jax.checkpoints import layout  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "m"
  model_dir.mkdir()
  hf = {**json.loads((pathlib.Path(fixture_dir) / "config.json").read_text()), **edit}
  (model_dir / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError) as e:
    layout.read_config(str(model_dir))
  assert str(e.value) == f"{model_dir}/config.json: {needle}"


@pytest.mark.parametrize("text,needle", [
    ('{"d_model": 64,', "not valid JSON (Expecting property name"),
    ("[1, 2]", "expected a JSON object, got a list"),
])
def test_config_json_that_is_no_object_is_named(tmp_path, text, needle):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match=rf"^{tmp_path}/config.json: {re.escape(needle)}"):
    config_from_model_dir(str(tmp_path))
