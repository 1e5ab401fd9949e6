"""`load(DIR)`: any LLaDA model directory -> a ready `Transformer`; Orbax param I/O.

Three kinds of model directory, all with `config.json` (HF LLaDA format) and
the tokenizer files at the top:

  * HF snapshot: safetensors shards + `model.safetensors.index.json`, one
    `model.safetensors`, or PyTorch `.bin` files (read only with torch);
  * converted:  `params/`, an Orbax checkpoint of the parameter pytree
    (`nnx.to_pure_dict(nnx.split(model)[1])`), written one parameter at a time;
  * workdir:    `checkpoints/`, an Orbax `CheckpointManager` directory whose
    steps hold items `params`, `opt_state`, `data`, `meta`; read at the newest
    complete step, `params` only.

Parameters land on the default device, or sharded over `mesh` by the logical
axis rules: Orbax reads each device's slice straight into its shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from llada_jax import hf_checkpoint
from llada_jax import model as model_lib
from llada_jax import sharding
from llada_jax.config import ModelConfig, config_from_model_dir

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"  # converted directory: the Orbax param checkpoint
CHECKPOINTS_DIR = "checkpoints"  # workdir: the CheckpointManager directory
PARAMS_ITEM = "params"  # CheckpointManager item holding the param pytree
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
_PYTREE_METADATA = "_METADATA"  # Orbax's pytree metadata file
# Orbax array chunks of at most this many bytes: a sharded restore reads only
# the chunks its shards overlap.
CHUNK_BYTES = 64 << 20


def model_dir_kind(path: str) -> str:
  """"hf" | "converted" | "workdir" for a model directory."""
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return "converted"
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return "workdir"
  return "hf"


def read_config(path: str, **overrides) -> ModelConfig:
  """`config_from_model_dir`, with errors naming the directory's config.json."""
  try:
    return config_from_model_dir(path, **overrides)
  except ValueError as e:
    msg = str(e)
    if msg.startswith(CONFIG_FILE):
      msg = os.path.join(path, msg)
    raise ValueError(msg) from e


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer (and generation config) files `src_dir` has; returns names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src_dir, name)):
      shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def write_config(dst_dir: str, cfg: ModelConfig, torch_dtype: str, source_dir: str) -> None:
  """Writes `config.json`: `cfg.to_hf()`, keeping `source_dir`'s values for keys
  that are no ModelConfig field (`_name_or_path`, `init_device`...), so they
  survive a conversion unchanged.
  """
  with open(os.path.join(source_dir, CONFIG_FILE)) as f:
    hf = json.load(f)
  fields = {f.name for f in dataclasses.fields(ModelConfig)} | {"torch_dtype"}
  for key, value in cfg.to_hf(torch_dtype=torch_dtype).items():
    if key in fields or key not in hf:
      hf[key] = value
  with open(os.path.join(dst_dir, CONFIG_FILE), "w") as f:
    json.dump(dict(sorted(hf.items())), f, indent=2)
    f.write("\n")


# ---- finding the param pytree on disk ------------------------------------

def latest_step_dir(checkpoints_dir: str) -> str:
  """The newest complete step directory of a CheckpointManager directory."""
  manager = ocp.CheckpointManager(
      os.path.abspath(checkpoints_dir), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f"{checkpoints_dir}: no complete checkpoint step")
  return str(ocp.step.find_step_path(checkpoints_dir, ocp.step.standard_name_format(),
                                     step=step))


def params_pytree_dir(path: str) -> str:
  """The Orbax pytree directory of the parameters under `path`.

  `path` may be a converted or workdir model directory, its `params/`, a
  CheckpointManager step directory, or the pytree directory itself.
  """
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, _PYTREE_METADATA)):
    return path
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return params_pytree_dir(latest_step_dir(os.path.join(path, CHECKPOINTS_DIR)))
  # converted `params/` (v1 layout: the pytree sits in `state/`) or a step's item.
  for sub in (PARAMS_DIR, "state", "pytree"):
    if os.path.isdir(os.path.join(path, sub)):
      return params_pytree_dir(os.path.join(path, sub))
  raise FileNotFoundError(f"{path}: no Orbax parameter checkpoint ({PARAMS_DIR}/ or "
                          f"{CHECKPOINTS_DIR}/ with a complete step)")


def flat_params(tree) -> dict[str, Any]:
  """{"blocks/q_proj": leaf, ...} of a param pytree (nested dict or nnx.State)."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def stored_params(pytree_dir: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{param path: (shape, dtype)} as stored, from the checkpoint's metadata."""
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(pytree_dir)).tree
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{pytree_dir}: unreadable Orbax checkpoint metadata ({e})") from e
  return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flat_params(tree).items()}


def check_params(stored: Mapping[str, tuple], expected: Mapping[str, tuple[int, ...]],
                 where: str) -> None:
  """Missing / unexpected / misshapen parameters -> ValueError naming the parameter."""
  for kind, names in (("missing", [k for k in expected if k not in stored]),
                      ("unexpected", [k for k in stored if k not in expected])):
    if names:
      raise ValueError(f"{where}: {kind} parameter {names[0]}"
                       + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                       + (" that config.json does not account for" if kind == "unexpected"
                          else ""))
  for name, shape in expected.items():
    if tuple(stored[name][0]) != tuple(shape):
      raise ValueError(f"{where}: parameter {name} has shape {tuple(stored[name][0])}, "
                       f"config.json implies {tuple(shape)}")


# ---- reading --------------------------------------------------------------

def _restore(pytree_dir: str, args: ocp.args.PyTreeRestore):
  return ocp.PyTreeCheckpointHandler().restore(epath.Path(pytree_dir), args=args)


def restore_params(dir_or_step_dir: str, abstract_state, shardings=None) -> dict[str, Any]:
  """Restores the param pytree, each array cast to its abstract dtype.

  Args:
    dir_or_step_dir: a converted or workdir model directory, or a
      CheckpointManager step / pytree directory (see `params_pytree_dir`).
    abstract_state: pytree (nnx.State or nested dict) of ShapeDtypeStructs
      naming every parameter; the checkpoint must hold exactly these shapes.
    shardings: a pytree of the same form with a `jax.sharding.Sharding` per
      parameter (e.g. `sharding.param_shardings`); each device reads only its
      own slice. Default: the first device.
  Returns:
    The parameters as a nested dict of jax.Arrays.
  """
  pytree_dir = params_pytree_dir(dir_or_step_dir)
  abstract = flat_params(abstract_state)
  check_params(stored_params(pytree_dir), {k: v.shape for k, v in abstract.items()},
               pytree_dir)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {k: device for k in abstract}
  else:
    placed = flat_params(shardings)
  restore_args = {k: ocp.ArrayRestoreArgs(sharding=placed[k], global_shape=a.shape,
                                          dtype=a.dtype) for k, a in abstract.items()}
  item = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed[k])
          for k, a in abstract.items()}
  return _restore(pytree_dir, ocp.args.PyTreeRestore(item=_nest(item),
                                                     restore_args=_nest(restore_args)))


class OrbaxParams(Mapping):
  """Read-only {param path: host np.ndarray} view of an Orbax param checkpoint.

  Each lookup restores that one parameter (stacked over layers), so a reader
  that walks the parameters in turn holds one of them at a time.
  """

  def __init__(self, path: str, dtype: str | None = None):
    self.pytree_dir = params_pytree_dir(path)
    self.stored = stored_params(self.pytree_dir)
    self.dtype = dtype

  def check(self, cfg: ModelConfig) -> None:
    check_params(self.stored, model_lib.param_shapes(cfg), self.pytree_dir)

  def source_dtype(self) -> str:
    kinds = sorted({str(d) for _, d in self.stored.values()})
    if len(kinds) != 1:
      raise ValueError(f"{self.pytree_dir}: parameters are stored in several dtypes "
                       f"{kinds}; pass --dtype")
    return kinds[0]

  def __getitem__(self, key: str) -> np.ndarray:
    shape, stored_dtype = self.stored[key]
    dtype = hf_checkpoint.NP_DTYPES[self.dtype] if self.dtype else stored_dtype
    out = _restore(self.pytree_dir, ocp.args.PyTreeRestore(
        item=_nest({key: jax.ShapeDtypeStruct(shape, dtype)}),
        restore_args=_nest({key: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)}),
        partial_restore=True))
    return flat_params(out)[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self.stored)

  def __len__(self) -> int:
    return len(self.stored)


# ---- writing --------------------------------------------------------------

class ParamWriter:
  """Writes a param pytree as an Orbax checkpoint, one parameter per call.

  Each `write` goes to disk before it returns (Orbax partial saves, no host
  copy of the array), so a caller streaming parameters holds one at a time;
  `close` finalizes `directory`, which before then does not exist.
  """

  def __init__(self, directory: str):
    from orbax.checkpoint.experimental import v1  # pylint: disable=g-import-not-at-top
    self._v1 = v1
    self.directory = os.path.abspath(directory)
    self._ctx = v1.Context()
    self._ctx.memory.deepcopy_host_arrays = False  # writes complete before returning
    self._ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES

  def write(self, param_path: str, array) -> None:
    with self._ctx:
      self._v1.partial.save(self.directory, _nest({param_path: array}))

  def close(self) -> None:
    with self._ctx:
      self._v1.partial.finalize(self.directory)


def save_params(directory: str, params) -> None:
  """Saves a param pytree (nested dict or nnx.State) to `directory` (must not exist)."""
  writer = ParamWriter(directory)
  for path, array in flat_params(params).items():
    writer.write(path, array)
  writer.close()


# ---- load -----------------------------------------------------------------

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
         **config_overrides) -> model_lib.Transformer:
  """Loads a LLaDA model directory of any kind (HF snapshot, converted, workdir).

  Args:
    path: the model directory (see the module docstring for the layouts).
    dtype: compute dtype, "float32" | "bfloat16".
    param_dtype: parameter dtype (default: `dtype`); stored values are cast.
    mesh, rules: place every parameter sharded by its logical axes (an Orbax
      checkpoint is restored straight into the shards; a dimension that does
      not divide its mesh axes is replicated, with a warning).
    **config_overrides: other ModelConfig fields (attention, remat_policy...).
  Returns:
    A `Transformer`; `model(ids, mask)` gives float32 logits and
    `graphdef, params = nnx.split(model)` the parameters as a pytree.
  """
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  abstract_model = model_lib.abstract(cfg, mesh=mesh, rules=rules)
  graphdef, state = nnx.split(abstract_model)
  if model_dir_kind(path) == "hf":
    reader = hf_checkpoint.open_reader(path)
    reader.check(cfg)  # every tensor accounted for before any data is read
    place = _placer(state, mesh, rules)
    for param_path, array in hf_checkpoint.read_params(reader, cfg, cfg.param_dtype):
      _set_path(state, param_path, place(param_path, array))
  else:
    shardings = None if mesh is None else sharding.param_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, restore_params(path, state, shardings))
  return nnx.merge(graphdef, state)
