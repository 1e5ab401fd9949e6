"""Logical axis rules -> mesh shardings, on 8 fake CPU devices."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import tiny
from llada_jax import sharding
from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.training import train


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh((1, -1, 2))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((2, 4, 2))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh((-1, -1, 2))


def test_hybrid_mesh_puts_slices_outermost_on_each_axis():
  # 8 fake devices as 2 slices of 4 (no slice_index: consecutive groups): data is 2
  # slices over DCN x 1, fsdp is 2 within a slice, tensor 2 within a slice.
  devices = jax.devices()
  mesh = sharding.make_mesh((1, -1, 2), devices=devices, dcn_shape=(2, 1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  slice_of = {d.id: i // 4 for i, d in enumerate(devices)}
  slices = np.vectorize(lambda d: slice_of[d.id])(mesh.devices)
  np.testing.assert_array_equal(slices, np.arange(2)[:, None, None] * np.ones((2, 2, 2)))
  # DCN on fsdp (inner ICI size 2): fsdp index = slice * 2 + position in the slice.
  grid = sharding.device_grid((1, 2, 2), (1, 2, 1), devices)
  assert grid.shape == (1, 4, 2)
  np.testing.assert_array_equal(np.vectorize(lambda d: slice_of[d.id])(grid)[0, :, 0],
                                [0, 0, 1, 1])
  with pytest.raises(ValueError, match="do not split into 3 slices"):
    sharding.make_mesh((1, -1, 1), devices=devices, dcn_shape=(3, 1, 1))


def test_training_mesh_has_the_expert_axis():
  cfg = tiny.get_config()
  cfg.mesh.update(fsdp=2, expert=2, tensor=1, dcn_data=2)
  mesh = train.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  assert train.batch_sharding(mesh).spec[0] == ("data", "fsdp", "expert")


def test_logical_to_spec_follows_the_rules():
  assert sharding.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
  assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  mesh = sharding.make_mesh((2, 2, 2))
  # A mesh axis is used at most once per array: batch takes data+fsdp, embed gets none.
  assert sharding.logical_to_spec(("batch", "length", "embed"), mesh=mesh,
                                  shape=(4, 8, 16)) == P(("data", "fsdp"), None, None)


def test_non_dividing_dimension_is_replicated_with_a_warning(caplog):
  mesh = sharding.make_mesh((1, 2, 4))
  with caplog.at_level(logging.WARNING):
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh=mesh,
                                    shape=(64, 2, 16), what="k_proj")
  assert spec == P("fsdp", None, None)
  assert "k_proj" in caplog.text and "replicating" in caplog.text


def test_sharded_model_gives_the_same_logits(tiny_model, reference):
  mesh = sharding.make_mesh((2, 2, 2))
  cfg = tiny_model.config
  graphdef, state = nnx.split(tiny_model)
  shardings = sharding.param_shardings(state, mesh)
  sharded_state = jax.device_put(state, shardings)
  q = sharded_state["blocks"]["q_proj"][...]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  # The same graph with activations constrained on the mesh.
  sharded = nnx.merge(nnx.split(model_lib.abstract(cfg, mesh=mesh))[0], sharded_state)
  ids = np.concatenate([reference["logits_input_ids"]] * 2)[:4]  # batch 4 over data*fsdp
  logits = sharded(ids)
  assert logits.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(logits, tiny_model(ids), atol=1e-4)
  # A model without a mesh of its own, traced under the caller's activation mesh.
  forward = sharding.under_mesh(lambda s, ids: nnx.merge(graphdef, s).forward(ids), mesh)
  assert jax.jit(forward)(sharded_state, ids).sharding.spec[0] == ("data", "fsdp")
