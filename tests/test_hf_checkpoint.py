"""Loading HF safetensors snapshots: the mapping table and every refusal."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llada_jax
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.config import config_from_model_dir

PREFIX = "model.transformer."


def _all_tensors(model_dir):
  index = json.loads((model_dir / hf_checkpoint.INDEX_FILE).read_text())
  tensors = {}
  for fname in sorted(set(index["weight_map"].values())):
    tensors.update(load_file(model_dir / fname))
  return tensors


def _single_file_snapshot(fixture_dir, tmp_path, edit=None, dtype=None):
  """A copy of the fixture as one model.safetensors, with `edit` applied."""
  src = tmp_path / "src"
  shutil.copytree(fixture_dir, src)
  tensors = _all_tensors(src)
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  if edit:
    edit(tensors)
  out = tmp_path / "single"
  out.mkdir()
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(src / name, out / name)
  save_file(tensors, out / hf_checkpoint.SINGLE_FILE)
  return str(out)


def test_table_covers_every_fixture_tensor_with_its_shape(fixture_dir):
  reader = hf_checkpoint.SafetensorsReader(fixture_dir)
  expected = hf_checkpoint.expected_hf_shapes(config_from_model_dir(fixture_dir))
  assert expected == reader.shapes


def test_table_maps_both_ways_exactly(fixture_dir):
  cfg = config_from_model_dir(fixture_dir)
  reader = hf_checkpoint.SafetensorsReader(fixture_dir)
  params = dict(hf_checkpoint.read_params(reader, cfg))
  assert params["blocks/q_proj"].shape == (2, 64, 4, 16)
  back = dict(hf_checkpoint.hf_tensors(params, cfg))
  assert set(back) == set(reader.shapes)
  for name, w in back.items():
    np.testing.assert_array_equal(w, reader.get(name))
  # q_proj: Flax [D, N, H] is torch's [N*H, D] transposed, heads contiguous.
  q0 = reader.get(PREFIX + "blocks.0.q_proj.weight")
  np.testing.assert_array_equal(params["blocks/q_proj"][0][:, 1, :], q0[16:32].T)


def test_single_file_and_bf16_sources_load(fixture_dir, tmp_path, reference):
  single = _single_file_snapshot(fixture_dir, tmp_path, dtype=ml_dtypes.bfloat16)
  model = llada_jax.load(single)  # bf16 on disk -> float32 params, exactly
  assert model.wte[...].dtype == np.float32
  stored = load_file(f"{single}/model.safetensors")[PREFIX + "wte.weight"]
  np.testing.assert_array_equal(np.asarray(model.wte[...]), stored.astype(np.float32))
  bf16 = llada_jax.load(single, dtype="bfloat16")
  np.testing.assert_array_equal(np.asarray(bf16.wte[...]), stored)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(PREFIX + "blocks.1.up_proj.weight"), "missing tensor .*blocks.1.up_proj"),
    (lambda t: t.update({PREFIX + "blocks.2.up_proj.weight": np.zeros((160, 64), np.float32)}),
     "unexpected tensor .*blocks.2.up_proj"),
    (lambda t: t.update({PREFIX + "ln_f.weight": np.zeros((65,), np.float32)}),
     r"ln_f.weight has shape \(65,\)"),
    (lambda t: t.update({PREFIX + "blocks.0.k_proj.weight": np.zeros((64, 64), np.float32)}),
     r"blocks.0.k_proj.weight has shape \(64, 64\), config.json implies \(32, 64\)"),
])
def test_bad_tensors_are_named(fixture_dir, tmp_path, edit, match):
  with pytest.raises(ValueError, match=match):
    llada_jax.load(_single_file_snapshot(fixture_dir, tmp_path, edit))


def test_index_naming_a_missing_shard_is_named(fixture_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(fixture_dir, broken)
  (broken / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    llada_jax.load(str(broken))


def test_corrupt_shard_is_named(fixture_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(fixture_dir, broken)
  shard = broken / "model-00001-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:1000])
  with pytest.raises(ValueError, match="model-00001-of-00002.safetensors"):
    llada_jax.load(str(broken))


def test_directory_without_weights_is_named(fixture_dir, tmp_path):
  empty = tmp_path / "cfg_only"
  empty.mkdir()
  shutil.copy(f"{fixture_dir}/config.json", empty / "config.json")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    llada_jax.load(str(empty))
