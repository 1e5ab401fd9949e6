"""Silent corruption: a per-array digest in our Orbax checkpoints, and a finiteness pass.

The digest of an array is two 32-bit weighted sums of its stored bit
patterns b_i (flat index i mod 2^32, j = i mod K, c = (i div K) mod 2^10 for
chunks of K = 2^22 elements):

  s1 = sum_i b_i (2 i + 1),   s2 = sum_i b_i h(j) g(c)   (mod 2^32)

with odd hashed weights h, g. Integer sums modulo 2^32 do not depend on the
order of addition, so the digest of a sharded device array is computed where
it lies, in one fused pass, and equals the host's (which is chunked: per chunk
two dot products with fixed weight tables and a sum); any single flipped bit
changes s1 (its weights are odd). It is recorded under
`custom_metadata["param_digests"]` of every Orbax checkpoint we write
(converter output and training steps) and checked on restore when the
restored dtype holds the stored one exactly (same dtype, or bf16 read as f32).
`python -m benchmarks.integrity` times the passes.

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
_K_BITS = 22
_CHUNK = 1 << _K_BITS  # elements per chunk: host passes, and the j / c split of the index
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


class CorruptCheckpointError(ValueError):
  """A parameter's stored bytes differ from the digest written with them."""


class NonFiniteError(ValueError):
  """A parameter holds NaN or Inf."""


def _h(j, xp):
  """Odd weight of the position within a chunk (uint32 arithmetic, numpy or jnp)."""
  j = j.astype(xp.uint32)
  return ((j * xp.uint32(0x9E3779B1)) ^ (j >> 13)) | xp.uint32(1)


def _g(c, xp):
  """Odd weight of the chunk number."""
  c = c.astype(xp.uint32)
  return (c * xp.uint32(0x85EBCA6B) + xp.uint32(0x27D4EB2F)) | xp.uint32(1)


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
  j = np.arange(_CHUNK, dtype=np.uint32)
  return 2 * j + 1, _h(j, np)


def _uint(dtype) -> Any:
  """The unsigned type of one stored word (8-byte elements are two uint32 words)."""
  return _UINT.get(np.dtype(dtype).itemsize, np.uint32)


def _format(s1, s2) -> str:
  return f"{int(s1) % 2**32:08x}{int(s2) % 2**32:08x}"


def _host_digest(x: np.ndarray) -> str:
  bits = np.ascontiguousarray(x).reshape(-1).view(_uint(x.dtype))
  w1, h = _tables()
  buf = None if bits.dtype == np.uint32 else np.empty(min(bits.size, _CHUNK), np.uint32)
  s1 = s2 = 0
  for start in range(0, bits.size, _CHUNK):
    b = bits[start:start + _CHUNK]
    if buf is not None:  # widen 8/16-bit words into a reused buffer
      b = buf[:b.size]
      np.copyto(b, bits[start:start + _CHUNK], casting="unsafe")
    n = b.size
    s1 += int(np.dot(b, w1[:n])) + 2 * (start % 2**32) * int(np.sum(b, dtype=np.uint64))
    s2 += int(_g(np.asarray((start >> _K_BITS) & 0x3FF), np)) * int(np.dot(b, h[:n]))
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
  j = index & jnp.uint32(_CHUNK - 1)
  c = (index >> _K_BITS) & jnp.uint32(0x3FF)
  s1 = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
  s2 = jnp.sum(bits * _h(j, jnp) * _g(c, jnp), dtype=jnp.uint32)
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
