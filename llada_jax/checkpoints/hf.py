"""HuggingFace LLaDA checkpoints: the mapping derived from the param table, and safetensors I/O.

The model family's parameter table (`models/llada.py` `PARAMS`, entries
`layers.params.ParamSpec`) gives each Flax parameter its PyTorch state-dict
name and says how the layout differs. Both directions (HF -> Flax when
loading or converting, Flax -> HF when exporting) are derived from it:

  * torch Linear weights are [out, in]; Flax kernels are [in..., out...] with
    the head axes split out (q: [D, N, H], attn_out: [N, H, D]);
  * per-layer tensors `blocks.{i}.*` are stacked on a leading layers axis.

Loading never runs pickled code: safetensors are parsed here; PyTorch `.bin`
files only through `torch.load(weights_only=True)` when torch is installed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 for numpy; safetensors needs it)
import numpy as np

from llada_jax import paths
from llada_jax.checkpoints import integrity
from llada_jax.config import ModelConfig
from llada_jax.layers.params import ParamSpec
from llada_jax import models

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def tensor_maps(cfg: ModelConfig) -> list[tuple[ParamSpec, tuple[int, ...]]]:
  """(table entry, full Flax shape) for every parameter this config has."""
  family = models.family(cfg)
  sizes = family.dim_sizes(cfg)
  return [(spec, spec.shape(sizes)) for spec in family.param_specs(cfg)]


def hf_entries(cfg: ModelConfig) -> list[tuple[ParamSpec, tuple[int, ...], list]]:
  """(table entry, full Flax shape, [(index into it, HF name)]) for every parameter."""
  family = models.family(cfg)
  sizes, layer_ids = family.dim_sizes(cfg), family.layer_ids(cfg)
  return [(spec, shape, spec.hf_entries(sizes, layer_ids)) for spec, shape in tensor_maps(cfg)]


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name the config implies, with its shape (a fused one once)."""
  sizes = models.family(cfg).dim_sizes(cfg)
  return {name: spec.hf_shape(shape[len(index):], sizes)
          for spec, shape, entries in hf_entries(cfg) for index, name in entries}


def _hf_part(spec: ParamSpec, w: np.ndarray, sizes) -> np.ndarray:
  """The rows of HF tensor `w` that are `spec`'s parameter (all of a plain tensor)."""
  if not spec.hf_parts:
    return w
  first, end, _ = spec.hf_rows(sizes)
  return w[first:end]


# safetensors dtype names <-> numpy dtypes (the float types a LLaDA checkpoint uses).
ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
             "F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors_header(path: str) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
  """(data start offset, {name: (dtype, shape, begin, end)}) of one safetensors file.

  Validates what a truncated or corrupt file breaks: the header length and
  JSON, known dtypes, byte sizes matching shapes, contiguous data offsets and
  the file size. Raises ValueError naming the file.
  """
  def bad(why):
    return ValueError(f"{path}: not a valid safetensors file ({why})")
  size = paths.getsize(path)
  with paths.open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"{size} bytes, too short for a header")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > 100_000_000:
      raise bad(f"header length {n} exceeds the file size {size}")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise bad(f"header is not JSON: {e}") from e
  if not isinstance(header, dict):
    raise bad(f"header is a JSON {type(header).__name__}, not an object")
  header.pop("__metadata__", None)
  for name, info in header.items():
    _check_header_entry(name, info, bad)
  tensors, offset = {}, 0
  for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype not in ST_DTYPES:
      raise bad(f"tensor {name} has dtype {dtype}, not a float type")
    if begin != offset or end - begin != math.prod(shape) * ST_DTYPES[dtype].itemsize:
      raise bad(f"tensor {name}: data offsets {begin}..{end} do not fit its shape {shape}")
    tensors[name] = (dtype, shape, begin, end)
    offset = end
  if 8 + n + offset != size:
    raise bad(f"truncated: the header describes {8 + n + offset} bytes, the file has {size}")
  return 8 + n, tensors


def _check_header_entry(name: str, info, bad) -> None:
  """A header entry is {"dtype": str, "shape": [int >= 0], "data_offsets": [int, int]}."""
  if not isinstance(info, dict):
    raise bad(f"tensor {name}: header entry is not an object")
  for key in ("dtype", "shape", "data_offsets"):
    if key not in info:
      raise bad(f"tensor {name}: header entry has no {key!r}")
  if not isinstance(info["dtype"], str):
    raise bad(f"tensor {name}: dtype {info['dtype']!r} is not a string")
  ints = lambda v: isinstance(v, list) and all(
      isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)
  if not ints(info["shape"]):
    raise bad(f"tensor {name}: shape {info['shape']!r} is not a list of sizes")
  if not ints(info["data_offsets"]) or len(info["data_offsets"]) != 2:
    raise bad(f"tensor {name}: data_offsets {info['data_offsets']!r} are not two offsets")


class TensorSource:
  """Tensors of an HF snapshot by name, with `check(cfg)` before any data is read.

  Subclasses fill `shapes`, `dtypes` (safetensors names: "BF16", "F32"...),
  `file_of` and implement `get(name)`.
  """
  model_dir: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, str]
  file_of: dict[str, str]

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

  def source_dtype(self) -> str:
    """The one dtype all tensors are stored in ("bfloat16", "float32"...)."""
    kinds = sorted(set(self.dtypes.values()))
    if len(kinds) != 1:
      raise ValueError(f"{self.model_dir}: tensors are stored in several dtypes {kinds}; "
                       f"pass --dtype")
    return DTYPE_NAMES.get(kinds[0], kinds[0])

  def nbytes(self) -> int:
    return sum(paths.getsize(os.path.join(self.model_dir, f))
               for f in set(self.file_of.values()))


def _weight_map(index_path: str) -> dict[str, str]:
  with paths.open(index_path) as f:
    try:
      return json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: not a weights index ({e})") from e


class SafetensorsReader(TensorSource):
  """Reads tensors of an HF snapshot by name: sharded (index) or single file.

  Construction validates the index and every header (each shard the index
  names exists and is intact); `get` reads one tensor with plain file reads
  (no memory map, so resident memory holds only the tensors in use; from a
  URL each tensor is one ranged read).
  """

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if paths.exists(index_path):
      weight_map = _weight_map(index_path)
    elif paths.exists(single_path):
      weight_map = None
    else:
      raise FileNotFoundError(
          f"{model_dir}: no weights ({INDEX_FILE}, {SINGLE_FILE}, {BIN_INDEX_FILE} or "
          f"{BIN_SINGLE_FILE}) and no Orbax checkpoint")
    self.shapes, self.dtypes, self.file_of = {}, {}, {}
    self._where: dict[str, tuple[int, int]] = {}
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    for fname in files:
      path = os.path.join(model_dir, fname)
      if not paths.exists(path):
        raise FileNotFoundError(f"{INDEX_FILE} names shard {fname}, which does not exist "
                                f"in {model_dir}")
      start, tensors = read_safetensors_header(path)
      for name, (dtype, shape, begin, end) in tensors.items():
        if weight_map is not None and weight_map.get(name) != fname:
          raise ValueError(f"{path}: holds tensor {name}, which {INDEX_FILE} places in "
                           f"{weight_map.get(name)}")
        self.shapes[name], self.dtypes[name], self.file_of[name] = shape, dtype, fname
        self._where[name] = (start + begin, end - begin)
    if weight_map is not None:
      for name, fname in weight_map.items():
        if name not in self.file_of:
          raise ValueError(f"{INDEX_FILE} lists tensor {name} in {fname}, which lacks it")

  def get(self, name: str) -> np.ndarray:
    path = os.path.join(self.model_dir, self.file_of[name])
    offset, nbytes = self._where[name]
    out = np.empty(self.shapes[name], ST_DTYPES[self.dtypes[name]])
    with paths.open(path, "rb") as f:
      f.seek(offset)
      got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != nbytes:
      raise ValueError(f"{path}: cannot read tensor {name} (file truncated while reading)")
    return out


BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"


class TorchBinReader(TensorSource):
  """PyTorch `.bin` snapshot, read with `torch.load(weights_only=True, mmap=True)`.

  Needs torch (`pip install 'llada_jax[torch]'`); `weights_only` refuses any
  pickled code. Shards are memory-mapped and opened one at a time.
  """

  def __init__(self, model_dir: str):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"{model_dir}: holds PyTorch .bin weights; reading them needs torch "
          f"(pip install 'llada_jax[torch]'), or convert them to safetensors first") from e
    self._torch = torch
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, BIN_INDEX_FILE)
    if paths.exists(index_path):
      files = sorted(set(_weight_map(index_path).values()))
    else:
      files = [BIN_SINGLE_FILE]
    self.shapes, self.dtypes, self.file_of = {}, {}, {}
    self._open_name, self._open_dict = None, None
    for fname in files:
      if not paths.exists(os.path.join(model_dir, fname)):
        raise FileNotFoundError(f"{BIN_INDEX_FILE} names shard {fname}, which does not "
                                f"exist in {model_dir}")
      for name, t in self._shard(fname).items():
        self.shapes[name] = tuple(t.shape)
        self.dtypes[name] = {"torch.float32": "F32", "torch.bfloat16": "BF16",
                             "torch.float16": "F16"}.get(str(t.dtype), str(t.dtype))
        self.file_of[name] = fname

  def _shard(self, fname: str) -> dict:
    if self._open_name != fname:
      path = os.path.join(self.model_dir, fname)
      self._open_dict = None
      try:
        if paths.is_remote(path):  # read whole (mmap needs a local file)
          with paths.open(path, "rb") as f:
            self._open_dict = self._torch.load(f, map_location="cpu", weights_only=True)
        else:
          self._open_dict = self._torch.load(path, map_location="cpu", weights_only=True,
                                             mmap=True)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: unreadable PyTorch checkpoint ({e})") from e
      self._open_name = fname
    return self._open_dict

  def get(self, name: str) -> np.ndarray:
    t = self._shard(self.file_of[name])[name].contiguous()
    if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def open_reader(model_dir: str) -> TensorSource:
  """The reader for a snapshot: safetensors if present, else PyTorch `.bin`."""
  has_bin = any(paths.exists(os.path.join(model_dir, f))
                for f in (BIN_INDEX_FILE, BIN_SINGLE_FILE))
  has_st = any(paths.exists(os.path.join(model_dir, f)) for f in (INDEX_FILE, SINGLE_FILE))
  if has_bin and not has_st:
    return TorchBinReader(model_dir)
  return SafetensorsReader(model_dir)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
  """"5GB" -> 5e9 bytes (decimal units as HF; "GiB" etc. binary); ints pass through."""
  if isinstance(text, int):
    return text
  t = text.strip().upper()
  num = t.rstrip("KMGTIB")
  unit = t[len(num):]
  try:
    value = float(num)
  except ValueError:
    value = -1
  if unit not in _SIZE_UNITS or value <= 0:
    raise ValueError(f"max_shard_size: {text!r} is not a size like '5GB' or '500MiB'")
  return int(value * _SIZE_UNITS[unit])


class SafetensorsShardWriter:
  """Streams tensors into safetensors shards of at most `max_shard_size` bytes.

  The whole plan (names, shapes, dtype -> shard and offset) is fixed up front,
  so every shard's header is written first and each tensor is appended as it
  arrives, in plan order; nothing but the tensor in hand is held. `close`
  writes `model.safetensors.index.json` (or, for one shard, names the file
  `model.safetensors` as HF does). A tensor larger than the limit gets a
  shard of its own.
  """

  def __init__(self, out_dir: str, shapes: dict[str, tuple[int, ...]], dtype: str,
               max_shard_size: int | str = "5GB"):
    self.out_dir = out_dir
    self.np_dtype = np.dtype(NP_DTYPES[dtype])
    limit = parse_size(max_shard_size)
    itemsize = self.np_dtype.itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
      nbytes = math.prod(shape) * itemsize
      if shards[-1] and size + nbytes > limit:
        shards.append([])
        size = 0
      shards[-1].append(name)
      size += nbytes
    n = len(shards)
    self.files = ([SINGLE_FILE] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self._shards = shards
    self._shapes = shapes
    self._order = [(f, name) for f, names in zip(self.files, shards) for name in names]
    self._next = 0
    self._handle = None
    self.total_size = sum(math.prod(s) * itemsize for s in shapes.values())

  def _open(self, shard: int) -> None:
    st_dtype = _ST_NAMES[self.np_dtype]
    header, offset = {}, 0
    for name in self._shards[shard]:
      end = offset + math.prod(self._shapes[name]) * self.np_dtype.itemsize
      header[name] = {"dtype": st_dtype, "shape": list(self._shapes[name]),
                      "data_offsets": [offset, end]}
      offset = end
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._handle = paths.open(os.path.join(self.out_dir, self.files[shard]), "wb")
    self._handle.write(len(raw).to_bytes(8, "little") + raw)

  def write(self, name: str, w: np.ndarray) -> None:
    """Appends tensor `name` (the next in plan order), cast to the shard dtype."""
    if self._next >= len(self._order) or self._order[self._next][1] != name:
      want = self._order[self._next][1] if self._next < len(self._order) else "nothing"
      raise ValueError(f"safetensors writer: got tensor {name}, expected {want}")
    if tuple(w.shape) != tuple(self._shapes[name]):
      raise ValueError(f"tensor {name}: shape {w.shape}, expected {self._shapes[name]}")
    fname = self._order[self._next][0]
    if self._handle is None:
      self._open(self.files.index(fname))
    w = np.ascontiguousarray(w, self.np_dtype)  # no copy when it already is
    self._handle.write(w.reshape(-1).view(np.uint8).data)
    self._next += 1
    if self._next == len(self._order) or self._order[self._next][0] != fname:
      self._handle.close()
      self._handle = None

  def close(self) -> list[str]:
    """Checks every tensor was written, writes the index; returns the file names."""
    if self._next != len(self._order):
      raise ValueError(f"safetensors writer: tensor {self._order[self._next][1]} "
                       f"was never written")
    if len(self.files) > 1:
      index = {"metadata": {"total_size": self.total_size},
               "weight_map": {name: f for f, name in self._order}}
      with paths.open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
      return self.files + [INDEX_FILE]
    return list(self.files)


def read_params(reader, cfg: ModelConfig, dtype: str | None = None,
                nonfinite_hint: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (Flax param path, numpy array in Flax layout), one parameter at a time.

  `reader` has `.get(name)`; `dtype` casts (default: the stored dtype). With
  `nonfinite_hint`, a tensor holding NaN / Inf is refused as it is read
  (ValueError naming the file and tensor, ending with the hint).
  Stacked parameters are assembled tensor by tensor (layer, expert) into one
  buffer; nothing is kept after a parameter is yielded, so once the caller
  drops it at most one (stacked) parameter is resident. An unstacked one is
  yielded without a copy (a transposed view when the layouts differ).
  """
  np_dtype = NP_DTYPES[dtype] if dtype else None

  def get(name):
    w = reader.get(name)
    if nonfinite_hint is not None:
      where = os.path.join(reader.model_dir, reader.file_of.get(name, ""))
      integrity.check_array_finite(name, w, where, nonfinite_hint, kind="tensor")
    return w

  sizes = models.family(cfg).dim_sizes(cfg)
  for spec, shape, entries in hf_entries(cfg):
    if not spec.stacked:
      buf = spec.to_flax(_hf_part(spec, get(spec.hf), sizes), shape)
      yield spec.path, buf if np_dtype is None else buf.astype(np_dtype, copy=False)
      continue
    buf = None
    for index, name in entries:
      w = spec.to_flax(_hf_part(spec, get(name), sizes), shape[len(index):])
      if buf is None:
        buf = np.empty(shape, np_dtype or w.dtype)
      buf[index] = w
      del w
    yield spec.path, buf
    del buf


def hf_tensors(params: dict[str, np.ndarray], cfg: ModelConfig
               ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) from Flax params keyed by path.

  `params` is any mapping (e.g. `checkpoints.orbax.OrbaxParams`, which
  restores on lookup); the names come in `expected_hf_shapes(cfg)` order. The
  parts of a fused tensor are concatenated when its first part comes.
  """
  specs = hf_entries(cfg)
  fused: dict[str, list[ParamSpec]] = {}
  for spec, _, _ in specs:
    if spec.hf_parts:
      fused.setdefault(spec.hf, []).append(spec)
  for spec, _, entries in specs:
    if spec.hf_parts and spec.hf_part:
      continue  # written with part 0
    group = sorted(fused[spec.hf], key=lambda s: s.hf_part) if spec.hf_parts else [spec]
    ws = [params[part.path] for part in group]
    for index, name in entries:
      tensors = [part.to_hf(np.asarray(w[index])) for part, w in zip(group, ws)]
      yield name, tensors[0] if len(tensors) == 1 else np.concatenate(tensors, axis=0)
    del ws  # `params` may restore lazily: hold one parameter (or fused group) at a time
