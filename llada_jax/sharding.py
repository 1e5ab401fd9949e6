"""Logical axis names -> mesh axes: the whole sharding policy in one table.

The model names every parameter axis and the main activations with logical
names (`embed`, `heads`, ...); this module alone maps them to the mesh axes
(`data`, `fsdp`, `tensor`). Replace `DEFAULT_RULES` (or pass `rules=`) to
change the policy; the model needs no change.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
EXPERT_MESH_AXES = ("data", "fsdp", "expert", "tensor")  # for expert-parallel MoE runs

# (logical axis, mesh axis or axes or None). FSDP shards the model dimension of
# every weight; tensor parallelism splits heads, MLP and vocabulary; the batch
# is split over the data axes (and `expert`: MoE meshes add that axis, see
# EXPERT_MESH_AXES; mesh axes a mesh lacks are ignored).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("experts", "expert"),  # MoE: experts over the `expert` mesh axis (when the mesh has one)
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[Any] | None = None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
  """A mesh over `devices`: axis i has shape[i] devices within a slice (ICI; one
  -1 entry = the remaining ones) times dcn_shape[i] slices (DCN, default 1)."""
  devices = list(jax.devices() if devices is None else devices)
  dcn_shape = tuple(dcn_shape or (1,) * len(shape))
  if not len(shape) == len(dcn_shape) == len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} (dcn {dcn_shape}) does not match axes "
                     f"{tuple(axis_names)}")
  slices = math.prod(dcn_shape)
  if len(devices) % slices:
    raise ValueError(f"mesh dcn shape {dcn_shape}: {len(devices)} devices do not split into "
                     f"{slices} slices")
  shape = _resolve(shape, len(devices) // slices)
  return Mesh(device_grid(shape, dcn_shape, devices), tuple(axis_names))


def _resolve(shape: Sequence[int], count: int) -> tuple[int, ...]:
  """`shape` with its -1 entry (if any) filled so that it covers `count` devices."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if count % rest:
      raise ValueError(f"mesh shape {shape}: {count} devices do not divide by {rest}")
    shape[shape.index(-1)] = count // rest
  if math.prod(shape) != count:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"{count} are available")
  return tuple(shape)


def device_grid(ici_shape: Sequence[int], dcn_shape: Sequence[int],
                devices: Sequence[Any]) -> np.ndarray:
  """Devices as an array of shape ici_shape[i] * dcn_shape[i]: on each axis the slice
  (DCN) index is the outer part, the position within the slice (ICI) the inner.

  Slices are the devices' `slice_index` groups (multi-slice TPU:
  `mesh_utils.create_hybrid_device_mesh`); devices without one (CPU, one slice)
  are split into consecutive groups.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  ici_shape, dcn_shape = tuple(ici_shape), tuple(dcn_shape)
  if math.prod(dcn_shape) == 1:
    return _ici_grid(ici_shape, devices)
  if len({getattr(d, "slice_index", None) for d in devices}) == math.prod(dcn_shape):
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  groups = np.array_split(np.asarray(devices, dtype=object), math.prod(dcn_shape))
  grid = np.stack([_ici_grid(ici_shape, list(g)) for g in groups]).reshape(
      dcn_shape + ici_shape)
  n = len(ici_shape)  # (dcn0, .., ici0, ..) -> (dcn0, ici0, dcn1, ici1, ..) -> merged
  grid = grid.transpose([j for i in range(n) for j in (i, n + i)])
  return grid.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])


def _ici_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  (fake or odd topologies)
    return np.asarray(devices, dtype=object).reshape(shape)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None,
                    what: str = "", warn: bool = True) -> P:
  """PartitionSpec for an array whose axes carry logical `names`.

  With `mesh` and `shape`, a dimension that does not divide its mesh axes is
  replicated instead (with a warning naming `what`), and a mesh axis is used
  at most once per array.
  """
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or a in mesh.shape))
    if axes and mesh is not None and shape is not None:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size and warn:
        logging.warning("%s: dimension %d (%s=%d) does not divide mesh axes %s (%d); "
                        "replicating it", what or "array", i, name, shape[i], axes, size)
      if shape[i] % size:
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def param_specs(state: nnx.State, rules: Rules = DEFAULT_RULES,
                mesh: Mesh | None = None) -> nnx.State:
  """A pytree like `state` with a PartitionSpec per variable (from its names)."""
  def spec(path, var):
    names = var.get_metadata().get("out_sharding")
    return logical_to_spec(names, rules, mesh, var.get_value().shape,
                           "/".join(str(p) for p in path))
  return nnx.map_state(spec, state) if hasattr(nnx, "map_state") else jax.tree.map_with_path(
      lambda path, v: spec(path, v), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for every variable in `state` (a pytree of the same form)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, rules, mesh),
                      is_leaf=lambda x: isinstance(x, P))


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("llada_jax_activation_mesh",
                                                          default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Code traced inside places activations on `mesh` by `rules` (`constrain`, the
  shard_map'd kernels); `mesh=None` turns that off."""
  token = _ACTIVE.set(None if mesh is None else (mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh | None, Rules]:
  """(mesh, rules) of the innermost `activation_mesh`, or (None, DEFAULT_RULES)."""
  return _ACTIVE.get() or (None, DEFAULT_RULES)


def under_mesh(fn, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`fn` traced inside `activation_mesh(mesh, rules)` (wrap it before `jax.jit`)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_mesh(mesh, rules):
      return fn(*args, **kwargs)
  base = fn.func if isinstance(fn, functools.partial) else fn  # jit's name: jit(train_step)
  wrapped.__name__ = wrapped.__qualname__ = getattr(base, "__name__", "wrapped")
  return wrapped


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None = None,
              mesh: Mesh | None = None) -> jax.Array:
  """Sharding constraint on an activation by logical names: on `mesh` by `rules`,
  else those of the active `activation_mesh`; no-op without a mesh."""
  if mesh is None:
    mesh, rules = active_mesh()
  if mesh is None or rules is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape, warn=False)))
