"""The SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

import jax

from llada_jax import sharding


def swiglu(x_BLD: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array
           ) -> jax.Array:
  """[B, L, D] -> [B, L, D] in x's dtype; the hidden [B, L, F] is constrained to `mlp`.

  The matmuls run on the B·L tokens as rows of [T, D] (batch-major, so a batch
  sharding stays on the rows): their weight gradients are then plain 2-D
  dots, where a contraction over both B and L made XLA:CPU write the hidden's
  gradients transposed (a sixth of a ~100M training step, `benchmarks/train.py`).
  """
  B, L, D = x_BLD.shape
  dt = x_BLD.dtype
  x_TD = x_BLD.reshape(B * L, D)
  act_TF = jax.nn.silu(x_TD @ gate_DF.astype(dt)) * (x_TD @ up_DF.astype(dt))
  act_BLF = sharding.constrain(act_TF.reshape(B, L, -1), ("batch", "length", "mlp"))
  return (act_BLF.reshape(B * L, -1) @ down_FD.astype(dt)).reshape(B, L, D)
