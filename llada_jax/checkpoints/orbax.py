"""Orbax checkpoints of the parameter pytree: metadata checks, (sharded) restore, streaming writes.

Every checkpoint written here carries a digest per parameter
(`integrity.py`), checked on restore with a finiteness pass; a training
workdir whose newest step fails either (or cannot be read) falls back to the
newest intact step, with a warning naming the broken one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from flax import traverse_util

from llada_jax import paths
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import integrity
from llada_jax.checkpoints.layout import custom_metadata, params_pytree_dir, params_pytree_dirs
from llada_jax.config import ModelConfig
from llada_jax import models

# Orbax array chunks of at most this many bytes: a sharded restore reads only
# the chunks its shards overlap.
CHUNK_BYTES = 64 << 20
LOAD_HINT = "pass allow_nonfinite=True to load it anyway"


class ParamsMismatchError(ValueError):
  """The checkpoint's parameters do not match config.json (not a damaged file)."""


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
      raise ParamsMismatchError(f"{where}: {kind} parameter {names[0]}"
                       + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                       + (" that config.json does not account for" if kind == "unexpected"
                          else ""))
  for name, shape in expected.items():
    if tuple(stored[name][0]) != tuple(shape):
      raise ParamsMismatchError(f"{where}: parameter {name} has shape {tuple(stored[name][0])}, "
                       f"config.json implies {tuple(shape)}")


# ---- reading --------------------------------------------------------------

def _restore(pytree_dir: str, args: ocp.args.PyTreeRestore):
  return ocp.PyTreeCheckpointHandler().restore(epath.Path(pytree_dir), args=args)


def recorded_digests(pytree_dir: str) -> dict[str, str]:
  """{param path: digest} written with the checkpoint ({} if written without).

  The digests sit in the custom metadata of the directory holding the pytree:
  a converted `params/` (pytree in `params/state`) or a workdir step (pytree in
  `<step>/params`).
  """
  digests = custom_metadata(os.path.dirname(pytree_dir)).get(integrity.DIGESTS_KEY)
  return digests if isinstance(digests, dict) else {}


def _restore_one(pytree_dir: str, abstract: dict[str, Any], placed: dict[str, Any],
                 allow_nonfinite: bool) -> dict[str, Any]:
  stored = stored_params(pytree_dir)
  check_params(stored, {k: v.shape for k, v in abstract.items()}, pytree_dir)
  restore_args = {k: ocp.ArrayRestoreArgs(sharding=placed[k], global_shape=a.shape,
                                          dtype=a.dtype) for k, a in abstract.items()}
  item = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed[k])
          for k, a in abstract.items()}
  out = _restore(pytree_dir, ocp.args.PyTreeRestore(item=_nest(item),
                                                    restore_args=_nest(restore_args)))
  integrity.verify(flat_params(out), {k: d for k, (_, d) in stored.items()},
                   recorded_digests(pytree_dir), pytree_dir, allow_nonfinite, LOAD_HINT)
  return out


def restore_params(dir_or_step_dir: str, abstract_state, shardings=None, *,
                   allow_nonfinite: bool = False) -> dict[str, Any]:
  """Restores the param pytree, each array cast to its abstract dtype, verified.

  Args:
    dir_or_step_dir: a converted or workdir model directory, or a
      CheckpointManager step / pytree directory (see `params_pytree_dir`).
      A workdir whose newest step is unreadable, corrupt (digest) or holds
      non-finite values falls back to the newest intact step (a warning names
      the broken one).
    abstract_state: pytree (nnx.State or nested dict) of ShapeDtypeStructs
      naming every parameter; the checkpoint must hold exactly these shapes.
    shardings: a pytree of the same form with a `jax.sharding.Sharding` per
      parameter (e.g. `sharding.param_shardings`); each device reads only its
      own slice. Default: the first device.
    allow_nonfinite: accept NaN / Inf values (else NonFiniteError naming one).
  Returns:
    The parameters as a nested dict of jax.Arrays.
  """
  candidates = params_pytree_dirs(dir_or_step_dir)
  abstract = flat_params(abstract_state)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {k: device for k in abstract}
  else:
    placed = flat_params(shardings)
  for i, pytree_dir in enumerate(candidates):
    try:
      out = _restore_one(pytree_dir, abstract, placed, allow_nonfinite)
    except ParamsMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any damage: fall back)
      if i + 1 == len(candidates):
        raise
      logging.getLogger(__name__).warning(
          "%s: broken checkpoint (%s); falling back to step %s",
          os.path.dirname(pytree_dir), str(e).splitlines()[0][:300],
          os.path.basename(os.path.dirname(candidates[i + 1])))
      continue
    return out
  raise AssertionError("unreachable")


class OrbaxParams(Mapping):
  """Read-only {param path: host np.ndarray} view of an Orbax param checkpoint.

  Each lookup restores that one parameter (stacked over layers), so a reader
  that walks the parameters in turn holds one of them at a time.
  """

  def __init__(self, path: str, dtype: str | None = None, allow_nonfinite: bool = False,
               nonfinite_hint: str = LOAD_HINT):
    self.pytree_dir = params_pytree_dir(path)
    self.stored = stored_params(self.pytree_dir)
    self.digests = recorded_digests(self.pytree_dir)
    self.dtype = dtype
    self.allow_nonfinite = allow_nonfinite
    self.nonfinite_hint = nonfinite_hint

  def check(self, cfg: ModelConfig) -> None:
    check_params(self.stored, models.param_shapes(cfg), self.pytree_dir)

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
    array = flat_params(out)[key]
    integrity.verify({key: array}, {key: stored_dtype}, self.digests, self.pytree_dir,
                     self.allow_nonfinite, self.nonfinite_hint)
    return array

  def __iter__(self) -> Iterator[str]:
    return iter(self.stored)

  def __len__(self) -> int:
    return len(self.stored)


# ---- writing --------------------------------------------------------------

class ParamWriter:
  """Writes a param pytree as an Orbax checkpoint, one parameter per call.

  Each `write` goes to disk before it returns (Orbax partial saves, no host
  copy of the array), so a caller streaming parameters holds one at a time;
  `close` finalizes `directory`, which before then does not exist. The
  digest of every parameter goes into the checkpoint's custom metadata.
  """

  def __init__(self, directory: str):
    from orbax.checkpoint.experimental import v1  # pylint: disable=g-import-not-at-top
    self._v1 = v1
    self.directory = paths.absolute(directory)
    self._ctx = v1.Context()
    self._ctx.memory.deepcopy_host_arrays = False  # writes complete before returning
    self._ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    self.digests: dict[str, str] = {}

  def write(self, param_path: str, array) -> None:
    self.digests[param_path] = integrity.digest(array)
    with self._ctx:  # custom metadata merges by top-level key: pass all digests so far
      self._v1.partial.save(self.directory, _nest({param_path: array}),
                            custom_metadata={integrity.DIGESTS_KEY: dict(self.digests)})

  def close(self) -> None:
    with self._ctx:
      self._v1.partial.finalize(self.directory)


def save_params(directory: str, params) -> None:
  """Saves a param pytree (nested dict or nnx.State) to `directory` (must not exist)."""
  writer = ParamWriter(directory)
  for path, array in flat_params(params).items():
    writer.write(path, array)
  writer.close()
