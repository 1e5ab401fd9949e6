"""`load(DIR)`: any model directory (HF snapshot, converted, workdir) -> a ready model.

Parameters land on the default device, or sharded over `mesh` by the logical
axis rules: Orbax reads each device's slice straight into its shard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llada_jax import sharding
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import hub
from llada_jax.checkpoints.layout import model_dir_kind, read_config
from llada_jax import models
from llada_jax.checkpoints.orbax import LOAD_HINT, flat_params, restore_params

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
  specs = flat_params(sharding.param_specs(state, rules, mesh))
  return lambda path, x: jax.device_put(x, NamedSharding(mesh, specs[path]))


def load(path: str, dtype: str = "float32", param_dtype: str | None = None, *,
         mesh: Mesh | None = None, rules: Any = sharding.DEFAULT_RULES,
         revision: str | None = None, allow_nonfinite: bool = False,
         **config_overrides) -> nnx.Module:
  """Loads a LLaDA model directory of any kind (HF snapshot, converted, workdir).

  Args:
    path: the model directory (see the module docstring for the layouts), or a
      Hub id `owner/name[@revision]` (downloaded into the Hub cache once).
    dtype: compute dtype, "float32" | "bfloat16".
    param_dtype: parameter dtype (default: `dtype`); stored values are cast.
    mesh, rules: place every parameter sharded by its logical axes (an Orbax
      checkpoint is restored straight into the shards; a dimension that does
      not divide its mesh axes is replicated, with a warning).
    revision: a Hub id's branch, tag or commit (instead of `@revision`).
    allow_nonfinite: accept NaN / Inf parameters (else a ValueError naming the
      tensor). Orbax checkpoints are also checked against their digests, and a
      workdir falls back past a broken newest step (see `orbax.restore_params`).
    **config_overrides: other ModelConfig fields (attention, remat_policy...).
  Returns:
    A `Transformer`; `model(ids, mask)` gives float32 logits and
    `graphdef, params = nnx.split(model)` the parameters as a pytree.
  """
  path = hub.resolve_model_dir(path, revision)
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  abstract_model = models.abstract(cfg, mesh=mesh, rules=rules)
  graphdef, state = nnx.split(abstract_model)
  if model_dir_kind(path) == "hf":
    reader = hf_checkpoint.open_reader(path)
    reader.check(cfg)  # every tensor accounted for before any data is read
    place = _placer(state, mesh, rules)
    hint = None if allow_nonfinite else LOAD_HINT
    for param_path, array in hf_checkpoint.read_params(reader, cfg, cfg.param_dtype, hint):
      _set_path(state, param_path, place(param_path, array))
  else:
    shardings = None if mesh is None else sharding.param_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, restore_params(path, state, shardings,
                                                   allow_nonfinite=allow_nonfinite))
  return nnx.merge(graphdef, state)
