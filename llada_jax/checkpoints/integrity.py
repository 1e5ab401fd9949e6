"""Silent corruption: a per-array digest in our Orbax checkpoints, and a finiteness pass.

The digest of an array is two 32-bit weighted sums of its stored bit
patterns, `sum_i bits_i * w_k(i) mod 2^32` with odd weights `w_k` of the flat
index `i`. Integer sums modulo 2^32 do not depend on the order of addition,
so the digest of a sharded device array is computed where it lies, in one
fused pass, and equals the digest of the same values on the host; any single
flipped bit changes it (the weights are odd). It is recorded under
`custom_metadata["param_digests"]` of every Orbax checkpoint we write
(converter output and training steps) and checked on restore when the
restored dtype holds the stored one exactly (same dtype, or bf16 read as f32).

`check_finite` refuses NaN / Inf parameters, naming the tensor: they load and
sample without error, as "!!!!!" text.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

DIGESTS_KEY = "param_digests"
_MIX = np.uint32(0x9E3779B1)  # Knuth's multiplicative hash constant
_CHUNK = 1 << 22  # host digests and finiteness checks run in chunks of 4M elements
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


class CorruptCheckpointError(ValueError):
  """A parameter's stored bytes differ from the digest written with them."""


class NonFiniteError(ValueError):
  """A parameter holds NaN or Inf."""


def _uint(dtype) -> Any:
  """The unsigned type of one stored word (8-byte elements are two uint32 words)."""
  return _UINT.get(np.dtype(dtype).itemsize, np.uint32)


def _format(s1, s2) -> str:
  return f"{int(s1) % 2**32:08x}{int(s2) % 2**32:08x}"


def _host_digest(x: np.ndarray) -> str:
  bits = np.ascontiguousarray(x).reshape(-1).view(_uint(x.dtype))
  s1 = s2 = 0
  for start in range(0, bits.size, _CHUNK):
    b = bits[start:start + _CHUNK].astype(np.uint32)
    i = np.arange(start, start + b.size, dtype=np.uint64).astype(np.uint32)
    s1 += int(np.sum(b * (2 * i + 1), dtype=np.uint32))
    s2 += int(np.sum(b * ((i * _MIX) | 1), dtype=np.uint32))
  return _format(s1, s2)


def _device_digest(x: jax.Array) -> jax.Array:
  """uint32 [2] digest of a device array (traced; sharded inputs stay sharded)."""
  bits = jax.lax.bitcast_convert_type(x, _uint(x.dtype)).astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):  # the flat (row-major) index, modulo 2^32
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= bits.shape[axis]
  s1 = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
  s2 = jnp.sum(bits * ((index * jnp.uint32(_MIX)) | 1), dtype=jnp.uint32)
  return jnp.stack([s1, s2])


@functools.partial(jax.jit, static_argnames=("as_dtypes",))
def _device_report(flat: dict[str, jax.Array], as_dtypes: tuple = ()
                   ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{path: (digest uint32 [2] of the values cast to `as_dtypes`' dtype, number of
  non-finite values)}; as_dtypes: ((path, dtype name), ...)."""
  cast = dict(as_dtypes)
  return {k: (_device_digest(x.astype(cast.get(k, x.dtype))),
              jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)) for k, x in flat.items()}


def digest(x) -> str:
  """The hex digest of one array (numpy on the host, jax wherever it lies)."""
  if isinstance(x, jax.Array):
    return _format(*np.asarray(jax.jit(_device_digest)(x)))
  return _host_digest(np.asarray(x))


def nonfinite_count(x: np.ndarray) -> int:
  """NaN + Inf values of a host array, in chunks (no full-size temporary)."""
  flat = np.asarray(x).reshape(-1)
  if not np.issubdtype(flat.dtype, np.floating) and flat.dtype != ml_dtypes.bfloat16:
    return 0
  return sum(int(flat.size - np.count_nonzero(np.isfinite(flat[s:s + _CHUNK])))
             for s in range(0, flat.size, _CHUNK))


def report(flat: Mapping[str, Any], as_dtypes: Mapping[str, Any] | None = None
           ) -> dict[str, tuple[str, int]]:
  """{path: (digest, non-finite count)} of flat params (device or host arrays).

  as_dtypes: {path: dtype} to digest the values cast to (the stored dtype of
  a parameter restored wider); the finiteness count is of the values as given.
  """
  as_dtypes = {k: np.dtype(v) for k, v in (as_dtypes or {}).items()}
  on_device = {k: v for k, v in flat.items() if isinstance(v, jax.Array)}
  out = {}
  if on_device:
    cast = tuple(sorted((k, d.name) for k, d in as_dtypes.items()
                        if k in on_device and d != on_device[k].dtype))
    for k, (d, bad) in jax.device_get(_device_report(on_device, as_dtypes=cast)).items():
      out[k] = (_format(*d), int(bad))
  for k, v in flat.items():
    if k not in on_device:
      v = np.asarray(v)
      out[k] = (_host_digest(v.astype(as_dtypes.get(k, v.dtype), copy=False)),
                nonfinite_count(v))
  return out


def check_finite(name: str, count: int, size: int, where: str, hint: str,
                 kind: str = "parameter") -> None:
  """NonFiniteError naming the tensor if `count` of its `size` values are NaN/Inf."""
  if count:
    raise NonFiniteError(f"{where}: {kind} {name} has non-finite values ({count} of "
                         f"{size} are NaN or Inf); {hint}")


def check_array_finite(name: str, x: np.ndarray, where: str, hint: str,
                       kind: str = "parameter") -> None:
  check_finite(name, nonfinite_count(x), np.size(x), where, hint, kind)


def verifiable(stored_dtype, restored_dtype) -> bool:
  """Whether restored values give back the stored bits (same dtype, or widened)."""
  stored, restored = np.dtype(stored_dtype), np.dtype(restored_dtype)
  return stored == restored or (stored == np.dtype(ml_dtypes.bfloat16)
                                and restored == np.dtype(np.float32))


def check_digests(got: Mapping[str, str], want: Mapping[str, str], where: str,
                  names: Iterable[str] | None = None) -> None:
  """CorruptCheckpointError naming the first parameter whose digest differs."""
  for name in (want if names is None else names):
    if name in want and name in got and got[name] != want[name]:
      raise CorruptCheckpointError(
          f"{where}: parameter {name} is corrupt (its checksum {got[name]} differs from "
          f"the {want[name]} recorded when it was written)")


def verify(flat: Mapping[str, Any], stored_dtypes: Mapping[str, Any], want: Mapping[str, str],
           where: str, allow_nonfinite: bool = False, hint: str = "") -> None:
  """Checks restored params: digests (where `verifiable`) and finiteness.

  flat: {path: array as restored}; stored_dtypes: {path: dtype on disk};
  want: the recorded digests ({} for a checkpoint written without them).
  Restored arrays of a wider dtype are digested cast back to the stored one.
  """
  checked = [k for k, x in flat.items()
             if k in want and verifiable(stored_dtypes.get(k, x.dtype), x.dtype)]
  rep = report(flat, {k: stored_dtypes[k] for k in checked if k in stored_dtypes})
  check_digests({k: rep[k][0] for k in checked}, want, where, names=checked)
  if not allow_nonfinite:
    for k, (_, bad) in rep.items():
      check_finite(k, bad, int(np.size(flat[k])), where, hint)
