"""One module per model family; each builds its Transformer from `llada_jax.layers`.

A family module has its parameter table (`PARAMS`, `param_specs`, `dim_sizes`,
`layer_ids`), its block function(s) and `Transformer`, and its config.json
mapping. `ModelConfig.family` names the family; the functions here dispatch on
it, so callers (loading, conversion, training, front ends) stay family-agnostic.
"""

from __future__ import annotations

from types import ModuleType

from flax import nnx

from llada_jax.config import ModelConfig
from llada_jax.models import llada, llada2, llada_moe

FAMILIES: dict[str, ModuleType] = {"llada": llada, "llada_moe": llada_moe, "llada2": llada2}


def family(cfg: ModelConfig) -> ModuleType:
  """The module of `cfg`'s model family."""
  return FAMILIES[cfg.family]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter of the model `cfg` describes, keyed by path."""
  return family(cfg).param_shapes(cfg)


def init(cfg: ModelConfig, seed: int = 0, **kwargs) -> nnx.Module:
  """A randomly initialised model of `cfg`'s family."""
  return family(cfg).Transformer(cfg, nnx.Rngs(params=seed), **kwargs)


def abstract(cfg: ModelConfig, **kwargs) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves: no memory, for loading into."""
  cls = family(cfg).Transformer
  return nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(params=0), **kwargs))
