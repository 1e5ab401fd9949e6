"""HuggingFace LLaDA checkpoints: the one name/layout table, and safetensors I/O.

`TENSOR_MAP` maps each Flax parameter to its PyTorch state-dict name(s) and
says how the layout differs. Both directions (HF -> Flax when loading or
converting, Flax -> HF when exporting) are derived from it:

  * torch Linear weights are [out, in]; Flax kernels are [in..., out...] with
    the head axes split out (q: [D, N, H], attn_out: [N, H, D]);
  * per-layer tensors `blocks.{i}.*` are stacked on a leading layers axis.

Loading never runs pickled code: only safetensors are read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 for numpy; safetensors needs it)
import numpy as np

from llada_jax.config import ModelConfig
from llada_jax.model import param_shapes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One Flax parameter <-> HF tensor(s).

  `param`: the Flax path ("blocks/q_proj"); `hf`: the state-dict name, with
  `{i}` for the layer of a stacked parameter; `linear_in_dims`: 0 for a tensor
  stored as is, else the number of leading Flax axes that form the torch
  Linear's `in` dimension (the rest form `out`).
  """
  param: str
  hf: str
  linear_in_dims: int = 0

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf

  def hf_name(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.stacked else self.hf

  def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor given the (per-layer) Flax shape."""
    if not self.linear_in_dims:
      return tuple(flax_shape)
    n = self.linear_in_dims
    return (math.prod(flax_shape[n:]), math.prod(flax_shape[:n]))

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


_PREFIX = "model.transformer."
TENSOR_MAP: tuple[TensorMap, ...] = (
    TensorMap("wte", _PREFIX + "wte.weight"),
    TensorMap("blocks/attn_norm", _PREFIX + "blocks.{i}.attn_norm.weight"),
    TensorMap("blocks/q_proj", _PREFIX + "blocks.{i}.q_proj.weight", 1),
    TensorMap("blocks/k_proj", _PREFIX + "blocks.{i}.k_proj.weight", 1),
    TensorMap("blocks/v_proj", _PREFIX + "blocks.{i}.v_proj.weight", 1),
    TensorMap("blocks/attn_out", _PREFIX + "blocks.{i}.attn_out.weight", 2),
    TensorMap("blocks/ff_norm", _PREFIX + "blocks.{i}.ff_norm.weight"),
    TensorMap("blocks/ff_proj", _PREFIX + "blocks.{i}.ff_proj.weight", 1),
    TensorMap("blocks/up_proj", _PREFIX + "blocks.{i}.up_proj.weight", 1),
    TensorMap("blocks/ff_out", _PREFIX + "blocks.{i}.ff_out.weight", 1),
    TensorMap("ln_f", _PREFIX + "ln_f.weight"),
    TensorMap("ff_out", _PREFIX + "ff_out.weight", 1),
)


def tensor_maps(cfg: ModelConfig) -> list[tuple[TensorMap, tuple[int, ...]]]:
  """(entry, full Flax shape) for every parameter this config has."""
  shapes = param_shapes(cfg)
  return [(m, shapes[m.param]) for m in TENSOR_MAP if m.param in shapes]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name the config implies, with its shape."""
  out = {}
  for m, shape in tensor_maps(cfg):
    if m.stacked:
      for i in range(shape[0]):
        out[m.hf_name(i)] = m.hf_shape(shape[1:])
    else:
      out[m.hf_name()] = m.hf_shape(shape)
  return out


class SafetensorsReader:
  """Reads tensors of an HF snapshot by name: sharded (index) or single file.

  Construction validates the index and the headers: every shard the index
  names exists, and the tensor set/shapes can be checked with `check(cfg)`
  before any data is read.
  """

  def __init__(self, model_dir: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise ValueError(f"{index_path}: not a safetensors index ({e})") from e
    elif os.path.exists(single_path):
      weight_map = None
    else:
      raise FileNotFoundError(
          f"{model_dir}: no {INDEX_FILE} or {SINGLE_FILE} (PyTorch .bin files are "
          f"read only by `python -m convert.hf_to_orbax`)")
    self._handles = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    self.file_of: dict[str, str] = {}
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    for fname in files:
      path = os.path.join(model_dir, fname)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{INDEX_FILE} names shard {fname}, which does not exist "
                                f"in {model_dir}")
      try:
        handle = safe_open(path, framework="numpy")
        names = list(handle.keys())
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from e
      self._handles[fname] = handle
      for name in names:
        if weight_map is not None and weight_map.get(name) != fname:
          raise ValueError(f"{path}: holds tensor {name}, which {INDEX_FILE} places in "
                           f"{weight_map.get(name)}")
        sl = handle.get_slice(name)
        self.shapes[name] = tuple(sl.get_shape())
        self.dtypes[name] = sl.get_dtype()
        self.file_of[name] = fname
    if weight_map is not None:
      for name, fname in weight_map.items():
        if name not in self.file_of:
          raise ValueError(f"{INDEX_FILE} lists tensor {name} in {fname}, which lacks it")

  def check(self, cfg: ModelConfig) -> None:
    """Missing / unexpected / misshapen tensors -> ValueError naming the tensor."""
    expected = expected_hf_shapes(cfg)
    missing = [n for n in expected if n not in self.shapes]
    if missing:
      raise ValueError(f"{self.model_dir}: missing tensor {missing[0]}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in self.shapes if n not in expected]
    if extra:
      raise ValueError(f"{self.model_dir}: unexpected tensor {extra[0]}"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                       + " that config.json does not account for")
    for name, shape in expected.items():
      if self.shapes[name] != shape:
        raise ValueError(f"{self.model_dir}: tensor {name} has shape {self.shapes[name]}, "
                         f"config.json implies {shape}")

  def get(self, name: str) -> np.ndarray:
    try:
      return self._handles[self.file_of[name]].get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{os.path.join(self.model_dir, self.file_of[name])}: cannot read "
                       f"tensor {name} ({e})") from e

  def nbytes(self) -> int:
    return sum(os.path.getsize(os.path.join(self.model_dir, f)) for f in self._handles)


def read_params(reader, cfg: ModelConfig, dtype: str | None = None
                ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (Flax param path, numpy array in Flax layout), one parameter at a time.

  `reader` has `.get(name)`; `dtype` casts (default: the stored dtype).
  Stacked parameters are assembled layer by layer into one buffer, so at most
  one stacked tensor is resident at a time.
  """
  np_dtype = NP_DTYPES[dtype] if dtype else None
  for m, shape in tensor_maps(cfg):
    if m.stacked:
      buf = None
      for i in range(shape[0]):
        w = m.to_flax(reader.get(m.hf_name(i)), shape[1:])
        if buf is None:
          buf = np.empty(shape, np_dtype or w.dtype)
        buf[i] = w
      yield m.param, buf
    else:
      w = m.to_flax(reader.get(m.hf_name()), shape)
      yield m.param, w if np_dtype is None else w.astype(np_dtype)


def hf_tensors(params: dict[str, np.ndarray], cfg: ModelConfig
               ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) from Flax params keyed by path."""
  for m, _ in tensor_maps(cfg):
    w = params[m.param]
    if m.stacked:
      for i in range(w.shape[0]):
        yield m.hf_name(i), m.to_hf(np.asarray(w[i]))
    else:
      yield m.hf_name(), m.to_hf(np.asarray(w))
