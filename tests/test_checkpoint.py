"""Orbax parameter checkpoints: converted dirs, training workdirs, sharded restore."""

import logging
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import llada_jax
from llada_jax import sharding
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import orbax as checkpoint
from llada_jax.config import config_from_model_dir
from llada_jax.convert import hf_to_orbax
from llada_jax.models import llada as model_lib


def _converted_dir(src_dir, dst, params):
  os.makedirs(dst)
  layout.write_config(dst, config_from_model_dir(src_dir), "float32", src_dir)
  layout.copy_tokenizer_files(src_dir, dst)
  checkpoint.save_params(os.path.join(dst, layout.PARAMS_DIR), params)
  return str(dst)


@pytest.fixture(scope="module")
def tiny_params(tiny_model):
  return nnx.to_pure_dict(nnx.split(tiny_model)[1])


@pytest.fixture(scope="module")
def converted(fixture_dir, tiny_params, tmp_path_factory):
  return _converted_dir(fixture_dir, tmp_path_factory.mktemp("c") / "converted", tiny_params)


def test_converted_dir_loads_with_reference_logits(converted, reference):
  assert layout.model_dir_kind(converted) == "converted"
  assert sorted(os.listdir(converted)) == ["config.json", "params", "special_tokens_map.json",
                                           "tokenizer.json", "tokenizer_config.json"]
  model = llada_jax.load(converted)
  logits = np.asarray(model(reference["logits_input_ids"]))
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def test_restore_casts_to_the_requested_dtype(converted, tiny_params):
  model = llada_jax.load(converted, dtype="bfloat16")
  assert model.blocks.q_proj[...].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(np.asarray(model.wte[...]),
                                np.asarray(tiny_params["wte"]).astype(ml_dtypes.bfloat16))


def test_sharded_restore_on_a_2x4_mesh(converted, tiny_model, reference, caplog):
  mesh = sharding.make_mesh((1, 2, 4))  # data=1, fsdp=2, tensor=4
  with caplog.at_level(logging.WARNING):
    model = llada_jax.load(converted, mesh=mesh)
  assert any("kv_heads=2" in r.getMessage() and "replicating" in r.getMessage()
             for r in caplog.records)
  state = nnx.to_pure_dict(nnx.split(model)[1])
  want = checkpoint.flat_params(sharding.param_shardings(nnx.split(model)[1], mesh))
  for path, array in checkpoint.flat_params(state).items():
    assert array.sharding == want[path], path
  # What the rules table asks for, spelled out; kv heads (2) do not divide tensor (4).
  assert state["blocks"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert state["blocks"]["k_proj"].sharding.spec == P(None, "fsdp", None, None)
  assert state["wte"].sharding.spec == P("tensor", "fsdp")
  assert state["ff_out"].sharding.spec == P("fsdp", "tensor")
  assert state["wte"].addressable_shards[0].data.shape == (1024 // 4, 64 // 2)
  ids = reference["logits_input_ids"]
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(tiny_model(ids)),
                             atol=1e-4, rtol=0)  # sharded reductions reorder sums


def _save_step(manager, step, params):
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave({"count": np.int32(step)}),
      data=ocp.args.JsonSave({"position": step}),
      meta=ocp.args.JsonSave({"step": step})))
  manager.wait_until_finished()


def test_workdir_reads_the_newest_complete_step(fixture_dir, tiny_params, tmp_path, reference):
  workdir = tmp_path / "workdir"
  os.makedirs(workdir)
  shutil.copy(f"{fixture_dir}/config.json", workdir)
  layout.copy_tokenizer_files(fixture_dir, workdir)
  manager = ocp.CheckpointManager(workdir / layout.CHECKPOINTS_DIR)
  doubled = jax.tree.map(lambda x: np.asarray(x) * 2, tiny_params)
  _save_step(manager, 1, doubled)
  _save_step(manager, 2, jax.tree.map(np.asarray, tiny_params))
  manager.close()
  # An interrupted later save: Orbax's temp directory, never finalized.
  shutil.copytree(workdir / "checkpoints" / "1", workdir / "checkpoints" / "3.orbax-checkpoint-tmp-0")
  assert layout.model_dir_kind(str(workdir)) == "workdir"
  assert layout.latest_step_dir(str(workdir / "checkpoints")).endswith("/2")
  model = llada_jax.load(str(workdir))
  np.testing.assert_allclose(np.asarray(model(reference["logits_input_ids"])),
                             reference["logits"], atol=1e-4, rtol=0)
  mesh = sharding.make_mesh((1, 2, 4))
  restored = checkpoint.restore_params(
      str(workdir), nnx.split(model)[1],
      sharding.param_shardings(nnx.split(model)[1], mesh))
  assert restored["blocks"]["ff_proj"].sharding == NamedSharding(mesh, P(None, "fsdp", "tensor"))


def test_workdir_without_a_complete_step_is_named(fixture_dir, tmp_path):
  workdir = tmp_path / "workdir"
  os.makedirs(workdir / layout.CHECKPOINTS_DIR)
  shutil.copy(f"{fixture_dir}/config.json", workdir)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint step"):
    llada_jax.load(str(workdir))


def test_missing_and_misshapen_params_are_named(fixture_dir, tiny_params, tmp_path):
  params = dict(tiny_params, blocks=dict(tiny_params["blocks"]))
  del params["blocks"]["up_proj"]
  bad = _converted_dir(fixture_dir, tmp_path / "missing", params)
  with pytest.raises(ValueError, match="missing parameter blocks/up_proj"):
    llada_jax.load(bad)
  params = dict(tiny_params, ln_f=np.zeros((65,), np.float32))
  bad = _converted_dir(fixture_dir, tmp_path / "shape", params)
  with pytest.raises(ValueError, match=r"parameter ln_f has shape \(65,\), config.json implies \(64,\)"):
    llada_jax.load(bad)
  params = dict(tiny_params, extra=np.zeros((3,), np.float32))
  bad = _converted_dir(fixture_dir, tmp_path / "extra", params)
  with pytest.raises(ValueError, match="unexpected parameter extra"):
    llada_jax.load(bad)


def test_orbax_params_restore_one_parameter_at_a_time(converted, tiny_params):
  params = checkpoint.OrbaxParams(converted)
  assert len(params) == len(checkpoint.flat_params(tiny_params)) == 12
  assert params.source_dtype() == "float32"
  q = params["blocks/q_proj"]
  assert isinstance(q, np.ndarray) and q.shape == model_lib.param_shapes(
      config_from_model_dir(converted))["blocks/q_proj"]
  np.testing.assert_array_equal(q, np.asarray(tiny_params["blocks"]["q_proj"]))
  bf16 = checkpoint.OrbaxParams(converted, dtype="bfloat16")["ln_f"]
  assert bf16.dtype == ml_dtypes.bfloat16


def test_directory_without_weights_or_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no Orbax parameter checkpoint"):
    checkpoint.restore_params(str(tmp_path), {})


def test_load_takes_a_relative_path(fixture_dir, tmp_path, monkeypatch):
  hf_to_orbax.convert(fixture_dir, str(tmp_path / "conv"), None, False, False)
  monkeypatch.chdir(tmp_path)
  model = llada_jax.load("conv")
  assert model.config.n_layers == 2


def _flip_a_byte(pytree_dir):
  """Flips one bit in the middle of the largest data file of an Orbax checkpoint."""
  files = [os.path.join(d, f) for d, _, names in os.walk(pytree_dir) for f in names]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def test_flipped_bytes_and_nonfinite_params_are_refused_naming_the_tensor(
    converted, fixture_dir, tiny_params, tmp_path):
  """Case 2 of issue 17: no silent corruption at load (digest, finiteness)."""
  assert checkpoint.recorded_digests(layout.params_pytree_dir(converted))  # written with them
  flipped = tmp_path / "flipped"
  shutil.copytree(converted, flipped)
  _flip_a_byte(flipped / layout.PARAMS_DIR)
  with pytest.raises(ValueError, match=r"parameter \S+ is corrupt \(its checksum"):
    llada_jax.load(str(flipped))
  params = jax.tree.map(np.asarray, tiny_params)
  params["blocks"]["ff_out"] = params["blocks"]["ff_out"].copy()
  params["blocks"]["ff_out"][1, 3, 5] = np.inf
  nan_dir = _converted_dir(fixture_dir, tmp_path / "nan", params)
  with pytest.raises(ValueError, match="parameter blocks/ff_out has non-finite values "
                                       r"\(1 of \d+ are NaN or Inf\); pass allow_nonfinite"):
    llada_jax.load(nan_dir)
  model = llada_jax.load(nan_dir, allow_nonfinite=True)  # for debugging
  assert not np.isfinite(np.asarray(model.blocks.ff_out[...])).all()
