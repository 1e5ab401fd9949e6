"""Ahead-of-time compile for TPU topologies (the compile test needs libtpu: `tpu` extra)."""

import importlib.util

import jax
import pytest

from configs import llada_moe_7b, tiny
from llada_jax.config import ModelConfig
from llada_jax.training import aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed")


def test_slice_names_map_to_topologies():
  assert aot.topology("v5p-64") == ("v5:2x4x4", 95 * aot.GIB)
  assert aot.topology("v5e-16")[0] == "v5e:4x4"
  assert aot.topology("v6e-8")[0] == "v6e:2x4"
  assert aot.topology("v4-32")[0] == "v4:2x2x4"
  assert aot.topology("v5e:2x2")[0] == "v5e:2x2"
  with pytest.raises(ValueError, match="not a standard slice"):
    aot.topology("v5p-6")
  with pytest.raises(ValueError, match="want a slice"):
    aot.topology("a100-8")


def _moe_config(**kw) -> ModelConfig:
  return ModelConfig.from_dict({**dict(llada_moe_7b.model_config()), **kw})


@needs_libtpu
def test_moe_auto_dispatch_follows_the_compile_target():
  """An AOT compile for TPU from this CPU host gets TPU's dispatch, not the host's."""
  assert aot.for_target(_moe_config(), jax.devices()).moe_impl == "tiled"
  assert aot.for_target(_moe_config(), aot.tpu_devices("v5e:2x2")).moe_impl == "ragged_dot"
  assert aot.for_target(_moe_config(moe_impl="dense"),
                        aot.tpu_devices("v5e:2x2")).moe_impl == "dense"


@needs_libtpu
def test_tiny_config_compiles_for_a_small_slice():
  cfg = tiny.get_config()
  cfg.update(batch_size=8, seq_len=128)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  out = aot.report(cfg, "v5e-4")
  assert out["chips"] == 4 and out["fits"], out
  assert 0 < out["peak_gib"] < 1
  assert out["arguments_gib"] > 0
  # compiled FLOPs of the step are at least the model's and within a few times it
  assert 0.9 < out["compiled_over_model"] < 5, out
