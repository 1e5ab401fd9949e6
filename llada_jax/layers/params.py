"""One table per model family drives parameter shapes, logical axes, init and the HF names.

A `ParamSpec` describes one Flax parameter: its path (`group/name`: the
parameter `name` of the submodule `group`), its dimensions as config letters,
the layer stack it is stacked over (a leading `layers` axis), its logical axis
names, its initialiser, and the HF state-dict tensor(s) it maps to (`{i}` =
the layer's index in the whole model, `{e}` = expert: one HF tensor per
expert, stacked on the parameter's `E` axis) with how the layouts differ; a
fused HF tensor (LLaDA2's `query_key_value`) is several parameters, each a run
of its rows (`hf_parts`). Model
construction (`make_params`), the checkpoint mapping (`checkpoints/hf.py`) and
the sharding rules all read the same table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter.

  `dims`: one config letter per (per-layer) axis, resolved by the family's
  `dim_sizes(cfg)`; `axes`: their logical names; `init`: "ones" | "zeros" | "normal"
  (truncated normal, std fan_in^-1/2 with fan_in the size of `fan_in` dims)
  | "embed" (std 0.02); `hf`: the state-dict name; `linear_in_dims`: 0 for a
  tensor stored as is, else how many leading Flax axes form the torch
  Linear's `in` dimension (torch Linear weights are [out, in]); `present`:
  whether a config has this parameter; `stack`: the size letter of the layer
  stack (e.g. "Y" = every layer) the parameter is stacked over, "" for none;
  `hf_parts`: for a fused HF tensor, the dims of each parameter in it, in the
  order their rows are stacked (first axis), and `hf_part` which one this is.
  """
  path: str
  dims: str
  axes: tuple[str, ...]
  init: str
  hf: str
  linear_in_dims: int = 0
  fan_in: str = ""
  present: Callable[[object], bool] = lambda cfg: True
  stack: str = ""
  hf_parts: tuple[str, ...] = ()
  hf_part: int = 0

  @property
  def stacked(self) -> bool:
    return bool(self.stack)

  def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Full Flax shape (with the leading layers axis when stacked)."""
    per_layer = tuple(sizes[d] for d in self.dims)
    return ((sizes[self.stack],) if self.stacked else ()) + per_layer

  def logical_axes(self) -> tuple[str, ...]:
    return (("layers",) if self.stacked else ()) + self.axes

  def hf_entries(self, sizes: Mapping[str, int], layer_ids: Mapping[str, Sequence[int]]
                 ) -> list[tuple[tuple[int, ...], str]]:
    """(index into the Flax array, HF tensor name) of each HF tensor of this parameter.

    A stacked parameter has one HF tensor per layer of its stack (`layer_ids`
    gives each stack's layers in the whole model); `{e}` in the name adds one
    per expert (the first per-layer axis).
    """
    layers = list(enumerate(layer_ids[self.stack])) if self.stacked else [(None, None)]
    experts = range(sizes["E"]) if "{e}" in self.hf else [None]
    return [(tuple(x for x in (j, e) if x is not None), self.hf.format(i=i, e=e))
            for j, i in layers for e in experts]

  def hf_rows(self, sizes: Mapping[str, int]) -> tuple[int, int, int]:
    """(first, end, total): the rows [first, end) of its fused HF tensor's `total`
    that this parameter is."""
    rows = [math.prod(sizes[d] for d in part) for part in self.hf_parts]
    first = sum(rows[:self.hf_part])
    return first, first + rows[self.hf_part], sum(rows)

  def hf_shape(self, flax_shape: tuple[int, ...], sizes: Mapping[str, int] | None = None
               ) -> tuple[int, ...]:
    """Shape of one HF tensor given the (per-layer) Flax shape (`sizes`: of a fused one)."""
    if not self.linear_in_dims:
      return tuple(flax_shape)
    n = self.linear_in_dims
    rows = self.hf_rows(sizes)[2] if self.hf_parts else math.prod(flax_shape[n:])
    return (rows, math.prod(flax_shape[:n]))

  def to_flax(self, w: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> Flax (per-layer) layout."""
    if not self.linear_in_dims:
      return w.reshape(flax_shape)
    return w.T.reshape(flax_shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    """Flax (per-layer) array -> HF tensor (contiguous)."""
    if not self.linear_in_dims:
      return np.ascontiguousarray(w)
    n = self.linear_in_dims
    in_size, out_size = math.prod(w.shape[:n]), math.prod(w.shape[n:])
    return np.ascontiguousarray(w.reshape(in_size, out_size).T)


def init_value(spec: ParamSpec, sizes: Mapping[str, int], key: jax.Array | None, dtype
               ) -> jax.Array:
  """The initial value of one parameter (float32 draws cast to `dtype`)."""
  shape = spec.shape(sizes)
  if spec.init in ("ones", "zeros"):
    return (jnp.ones if spec.init == "ones" else jnp.zeros)(shape, dtype)
  fan_in = math.prod(sizes[d] for d in spec.fan_in) if spec.fan_in else 1
  std = 0.02 if spec.init == "embed" else fan_in ** -0.5
  value = std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
  return value.astype(dtype)


def make_param(spec: ParamSpec, sizes: Mapping[str, int], rngs: nnx.Rngs, dtype) -> nnx.Param:
  """An `nnx.Param` carrying its logical axis names as `out_sharding` metadata."""
  key = None if spec.init in ("ones", "zeros") else rngs.params()  # constants draw no key
  value = init_value(spec, sizes, key, dtype)
  return nnx.Param(value, out_sharding=spec.logical_axes(), eager_sharding=False)


def present_specs(table: Sequence[ParamSpec], cfg) -> list[ParamSpec]:
  """The entries of a family's table that `cfg` has."""
  return [spec for spec in table if spec.present(cfg)]


def shapes(specs: Sequence[ParamSpec], sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
  """{path: full Flax shape} of table entries."""
  return {spec.path: spec.shape(sizes) for spec in specs}
