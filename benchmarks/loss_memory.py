"""Memory of the training loss and its gradient: full logits vs vocabulary chunks.

  python -m benchmarks.loss_memory [--seq_len 4096 --vocab 126464 --d_model 4096]
      [--chunks 0,4096,8192,16384] [--dtype bfloat16] [--output out/loss_memory.json]

Compiles (does not run) value_and_grad of the masked-diffusion loss of one row
with respect to the final hidden states [1, L, D] (compute dtype) and the
float32 output head [D, V], for the full [1, L, V] float32 logits (chunk 0)
and for `objectives.chunked_masked_loss` at each chunk size, and reports XLA's
compiled memory analysis: temporaries (the loss's working memory), arguments
and outputs, in bytes and GiB. The head's own copies (its compute-dtype cast
and gradient) do not grow with the batch, so the same is compiled for two rows
too: `temp_per_row_bytes` = temp(2 rows) - temp(1 row), what each row a device
holds adds. Deterministic: it measures programs, not time.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from benchmarks import common
from llada_jax.training import objectives

GIB = 2 ** 30


def loss_fn(chunk: int, dtype):
  """(x_BLD, head_DV float32, targets_BL, noise) -> loss, as `train.model_loss` computes it."""
  def f(x_BLD, head_DV, targets_BL, noise):
    head_DV = head_DV.astype(dtype)
    if chunk:
      return objectives.chunked_masked_loss(x_BLD, head_DV, targets_BL, noise, chunk)
    logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, head_DV, preferred_element_type=jnp.float32)
    return objectives.masked_loss(logits_BLV, targets_BL, noise)
  return f


def temp_bytes(chunk: int, rows: int, seq_len: int, vocab: int, d_model: int, dtype):
  """XLA's memory analysis of the compiled loss-and-gradient for `rows` rows."""
  B, L = rows, seq_len
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
  noise = objectives.Noise(spec((B, L), jnp.int32), spec((B, L), jnp.bool_),
                           spec((B, L), jnp.float32), spec((B, L), jnp.float32),
                           spec((B, L), jnp.int32))
  args = (spec((B, L, d_model), dtype), spec((d_model, vocab), jnp.float32),
          spec((B, L), jnp.int32), noise)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn(chunk, dtype), argnums=(0, 1)))
  return grad_fn.lower(*args).compile().memory_analysis()


def measure(chunk: int, seq_len: int, vocab: int, d_model: int, dtype) -> dict:
  one, two = (temp_bytes(chunk, rows, seq_len, vocab, d_model, dtype) for rows in (1, 2))
  out = {"chunk": chunk, "chunks": math.ceil(vocab / chunk) if chunk else 1}
  for name in ("temp", "argument", "output"):
    n = getattr(one, f"{name}_size_in_bytes")
    out[f"{name}_bytes"], out[f"{name}_gib"] = n, n / GIB
  per_row = two.temp_size_in_bytes - one.temp_size_in_bytes
  out["temp_per_row_bytes"], out["temp_per_row_gib"] = per_row, per_row / GIB
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seq_len", type=int, default=4096)
  ap.add_argument("--vocab", type=int, default=126464)
  ap.add_argument("--d_model", type=int, default=4096)
  ap.add_argument("--chunks", default="0,4096,8192,16384", help="0 = full logits")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--output", default="")
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  runs = [measure(int(c), args.seq_len, args.vocab, args.d_model, dtype)
          for c in args.chunks.split(",")]
  full = next((r for r in runs if r["chunk"] == 0), None)
  for r in runs:
    if full:
      r["temp_vs_full"] = r["temp_bytes"] / full["temp_bytes"]
      r["temp_per_row_vs_full"] = r["temp_per_row_bytes"] / full["temp_per_row_bytes"]
  common.write_json({
      "benchmark": "loss_memory", "machine": common.machine(), "rows": 1,
      "seq_len": args.seq_len, "vocab": args.vocab, "d_model": args.d_model,
      "dtype": args.dtype,
      "full_logits_float32_gib": args.seq_len * args.vocab * 4 / GIB,
      "runs": runs}, args.output)


if __name__ == "__main__":
  main()
