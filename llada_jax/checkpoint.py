"""`load(DIR)`: a model directory -> a ready `Transformer` with its config.

A model directory is an HF snapshot (config.json + safetensors). Parameters
land on the default device, or sharded over `mesh` by the logical axis rules.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llada_jax import hf_checkpoint
from llada_jax import model as model_lib
from llada_jax import sharding
from llada_jax.config import config_from_model_dir


def _set_path(state: nnx.State, path: str, value) -> None:
  node = state
  *parents, leaf = path.split("/")
  for p in parents:
    node = node[p]
  node[leaf].set_value(value)


def _placer(state: nnx.State, mesh: Mesh | None, rules):
  """path -> function putting a host array on device(s) with its sharding."""
  if mesh is None:
    return lambda path, x: jnp.asarray(x)
  specs = sharding.param_specs(state, rules, mesh)
  def place(path, x):
    node = specs
    for p in path.split("/"):
      node = node[p]
    spec = node.value if isinstance(node, nnx.Variable) else node
    return jax.device_put(x, NamedSharding(mesh, spec))
  return place


def load(path: str, dtype: str = "float32", param_dtype: str | None = None, *,
         mesh: Mesh | None = None, rules: Any = sharding.DEFAULT_RULES,
         **config_overrides) -> model_lib.Transformer:
  """Loads a LLaDA model directory.

  Args:
    path: an HF LLaDA snapshot (config.json + safetensors shards and index,
      or a single model.safetensors).
    dtype: compute dtype, "float32" | "bfloat16".
    param_dtype: parameter dtype (default: `dtype`).
    mesh, rules: place every parameter sharded by its logical axes.
    **config_overrides: other ModelConfig fields (attention, remat_policy...).
  Returns:
    A `Transformer`; `model(ids, mask)` gives float32 logits and
    `graphdef, params = nnx.split(model)` the parameters as a pytree.
  """
  cfg = config_from_model_dir(path, dtype=dtype, param_dtype=param_dtype or dtype,
                              **config_overrides)
  reader = hf_checkpoint.SafetensorsReader(path)
  reader.check(cfg)  # every tensor accounted for before any data is read
  abstract_model = model_lib.abstract(cfg, mesh=mesh, rules=rules)
  graphdef, state = nnx.split(abstract_model)
  place = _placer(state, mesh, rules)
  for param_path, array in hf_checkpoint.read_params(reader, cfg, cfg.param_dtype):
    _set_path(state, param_path, place(param_path, array))
  return nnx.merge(graphdef, state)
