"""The SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

import jax
import jax.numpy as jnp

from llada_jax import sharding


def swiglu(x_BLD: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array
           ) -> jax.Array:
  """[B, L, D] -> [B, L, D] in x's dtype; the hidden [B, L, F] is constrained to `mlp`."""
  dt = x_BLD.dtype
  gate_BLF = jnp.einsum("bld,df->blf", x_BLD, gate_DF.astype(dt))
  up_BLF = jnp.einsum("bld,df->blf", x_BLD, up_DF.astype(dt))
  act_BLF = sharding.constrain(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "length", "mlp"))
  return jnp.einsum("blf,fd->bld", act_BLF, down_FD.astype(dt))
