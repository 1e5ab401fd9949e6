"""The LLaDA Transformer in Flax NNX: bidirectional, LLaMA-style, no timestep.

Per block (pre-norm, SPEC §1):
  h = x + attn_out(Attn(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1))), n1 = attn_norm(x)
  y = h + ff_out(silu(ff_proj(n2)) * up_proj(n2)),                        n2 = ff_norm(h)
then `ln_f` and the output head (`ff_out`, or the embedding when tied).

Shapes: B batch, L length, D d_model, N heads, K kv heads, H head dim,
F mlp hidden, V embedding_size, Y layers. Layer weights are stacked on a
leading `layers` axis and run under `lax.scan` (one compiled layer).
The module knows logical axis names only; `sharding.py` maps them to a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from llada_jax import sharding
from llada_jax.config import ModelConfig
from llada_jax.layers import attention as attention_lib
from llada_jax.layers.attention import KVCache
from llada_jax.layers.mlp import swiglu
from llada_jax.layers.norms import rms_norm
from llada_jax.layers.params import ParamSpec, make_param
from llada_jax.layers.rope import apply_rope, rope_tables

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Rematerialisation policies for the scanned layer (names as in MaxText).
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_HF = "model.transformer."
# The one parameter table (docs/spec.md §1-2): shapes, logical axes, init and HF names.
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("wte", "VD", ("vocab", "embed"), "embed", _HF + "wte.weight"),
    ParamSpec("blocks/attn_norm", "D", ("embed",), "ones", _HF + "blocks.{i}.attn_norm.weight"),
    ParamSpec("blocks/q_proj", "DNH", ("embed", "heads", "head_dim"), "normal",
              _HF + "blocks.{i}.q_proj.weight", 1, "D"),
    ParamSpec("blocks/k_proj", "DKH", ("embed", "kv_heads", "head_dim"), "normal",
              _HF + "blocks.{i}.k_proj.weight", 1, "D"),
    ParamSpec("blocks/v_proj", "DKH", ("embed", "kv_heads", "head_dim"), "normal",
              _HF + "blocks.{i}.v_proj.weight", 1, "D"),
    ParamSpec("blocks/attn_out", "NHD", ("heads", "head_dim", "embed"), "normal",
              _HF + "blocks.{i}.attn_out.weight", 2, "D"),
    ParamSpec("blocks/ff_norm", "D", ("embed",), "ones", _HF + "blocks.{i}.ff_norm.weight"),
    ParamSpec("blocks/ff_proj", "DF", ("embed", "mlp"), "normal",
              _HF + "blocks.{i}.ff_proj.weight", 1, "D"),
    ParamSpec("blocks/up_proj", "DF", ("embed", "mlp"), "normal",
              _HF + "blocks.{i}.up_proj.weight", 1, "D"),
    ParamSpec("blocks/ff_out", "FD", ("mlp", "embed"), "normal",
              _HF + "blocks.{i}.ff_out.weight", 1, "F"),
    ParamSpec("ln_f", "D", ("embed",), "ones", _HF + "ln_f.weight"),
    ParamSpec("ff_out", "DV", ("embed", "vocab"), "normal", _HF + "ff_out.weight", 1, "D",
              present=lambda cfg: not cfg.weight_tying),
)
# Logical axis names of every parameter (per layer; scanned ones get `layers` first).
PARAM_AXES = {spec.path: spec.axes for spec in PARAMS}


def dim_sizes(cfg: ModelConfig) -> dict[str, int]:
  """Size of each dimension letter used in `PARAMS`."""
  return {"D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.head_dim,
          "F": cfg.mlp_hidden_size, "V": cfg.embedding_size, "Y": cfg.n_layers}


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
  """The table entries this config has (no `ff_out` head when weights are tied)."""
  return [spec for spec in PARAMS if spec.present(cfg)]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter, keyed by path (block ones with the leading `layers` axis)."""
  sizes = dim_sizes(cfg)
  return {spec.path: spec.shape(sizes) for spec in param_specs(cfg)}


class Blocks(nnx.Module):
  """All Transformer layers' weights, stacked on a leading `layers` axis."""

  def __init__(self, params: dict[str, nnx.Param]):
    for path, param in params.items():
      setattr(self, path.removeprefix("blocks/"), param)


def block_forward(p: dict[str, jax.Array], x_BWD: jax.Array, mask_BS: jax.Array | None,
                  sin_WH: jax.Array, cos_WH: jax.Array, cfg: ModelConfig,
                  constrain=lambda x, names: x, kv_BSKH=None, start=0, fresh_from=None):
  """One Transformer layer on per-layer weights `p` (compute dtype = x's).

  Without `kv_BSKH` the W positions attend to themselves (S = W). With a cached
  (k, v) pair of length S, the window's fresh keys/values are written into it
  at `start` and the window attends to all S positions; window positions
  before `fresh_from` (absolute, may be traced) keep the cached ones instead.
  -> (y [B, W, D], (k [B, S, K, H], v [B, S, K, H])).
  """
  dt = x_BWD.dtype
  n1_BWD = rms_norm(x_BWD, p["attn_norm"], cfg.rms_norm_eps)
  q_BWNH = jnp.einsum("bwd,dnh->bwnh", n1_BWD, p["q_proj"].astype(dt))
  k_BWKH = jnp.einsum("bwd,dkh->bwkh", n1_BWD, p["k_proj"].astype(dt))
  v_BWKH = jnp.einsum("bwd,dkh->bwkh", n1_BWD, p["v_proj"].astype(dt))
  q_BWNH = constrain(apply_rope(q_BWNH, sin_WH, cos_WH), ("batch", "length", "heads", "head_dim"))
  k_BWKH = constrain(apply_rope(k_BWKH, sin_WH, cos_WH), ("batch", "length", "kv_heads", "head_dim"))
  if kv_BSKH is None:
    k_BSKH, v_BSKH = k_BWKH, v_BWKH
  else:
    W = x_BWD.shape[1]
    if fresh_from is not None:
      stale_W1 = (start + jnp.arange(W) < fresh_from)[:, None, None]
      k_BWKH, v_BWKH = (
          jnp.where(stale_W1, jax.lax.dynamic_slice_in_dim(cached, start, W, axis=1), fresh)
          for fresh, cached in ((k_BWKH, kv_BSKH[0]), (v_BWKH, kv_BSKH[1])))
    k_BSKH = jax.lax.dynamic_update_slice_in_dim(kv_BSKH[0], k_BWKH.astype(kv_BSKH[0].dtype),
                                                 start, axis=1)
    v_BSKH = jax.lax.dynamic_update_slice_in_dim(kv_BSKH[1], v_BWKH.astype(kv_BSKH[1].dtype),
                                                 start, axis=1)
  att_BWNH = attention_lib.attention(q_BWNH, k_BSKH.astype(dt), v_BSKH.astype(dt), mask_BS,
                                     impl=cfg.attention)
  h_BWD = x_BWD + jnp.einsum("bwnh,nhd->bwd", att_BWNH, p["attn_out"].astype(dt))
  h_BWD = constrain(h_BWD, ("batch", "length", "embed"))
  n2_BWD = rms_norm(h_BWD, p["ff_norm"], cfg.rms_norm_eps)
  y_BWD = h_BWD + swiglu(n2_BWD, p["ff_proj"], p["up_proj"], p["ff_out"], constrain)
  return constrain(y_BWD, ("batch", "length", "embed")), (k_BSKH, v_BSKH)


class Transformer(nnx.Module):
  """The LLaDA mask predictor: token ids [B, L] -> float32 logits [B, L, V].

  `mesh`/`rules` (static, optional) only add sharding constraints on the
  activations; parameters carry logical names either way.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
               rules: Any = sharding.DEFAULT_RULES):
    self.config = cfg
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else None
    dtype, sizes = DTYPES[cfg.param_dtype], dim_sizes(cfg)
    made = {spec.path: make_param(spec, sizes, rngs, dtype) for spec in param_specs(cfg)}
    self.blocks = Blocks({k: v for k, v in made.items() if k.startswith("blocks/")})
    for path, param in made.items():
      if "/" not in path:
        setattr(self, path, param)

  def _constrain(self, x, names):
    return sharding.constrain(x, names, self.rules, self.mesh)

  def _run(self, ids_BW, mask_BS, start, cache: KVCache | None, return_kv: bool,
           fresh_from=None, head: bool = True):
    """Embed -> scanned layers -> ln_f -> head, for positions start…start+W−1.

    `head=False` stops after ln_f: (hidden states [B, W, D], None).
    """
    cfg = self.config
    dt = DTYPES[cfg.dtype]
    ids_BW = jnp.asarray(ids_BW, jnp.int32)
    x_BWD = self._constrain(jnp.take(self.wte[...], ids_BW, axis=0).astype(dt),
                            ("batch", "length", "embed"))
    sin_WH, cos_WH = rope_tables(ids_BW.shape[1], cfg.head_dim, cfg.rope_theta, start)
    mask_BS = None if mask_BS is None else jnp.asarray(mask_BS)

    def layer(x_BWD, xs):
      p, kv = xs
      y_BWD, kv = block_forward(p, x_BWD, mask_BS, sin_WH, cos_WH, cfg, self._constrain,
                                kv, start, fresh_from)
      return y_BWD, (kv if return_kv else None)

    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
    stacked = {k: v[...] for k, v in vars(self.blocks).items() if isinstance(v, nnx.Param)}
    xs = (stacked, None if cache is None else (cache.k_YBSKH, cache.v_YBSKH))
    if cfg.scan_layers:
      x_BWD, kv = jax.lax.scan(layer, x_BWD, xs)
    else:
      outs = []
      for i in range(cfg.n_layers):
        x_BWD, kv_i = layer(x_BWD, jax.tree.map(lambda a, i=i: a[i], xs))
        outs.append(kv_i)
      kv = jax.tree.map(lambda *a: jnp.stack(a), *outs) if return_kv else None
    x_BWD = rms_norm(x_BWD, self.ln_f[...], cfg.rms_norm_eps)
    if not head:
      return x_BWD, None
    head_DV = self.head_DV()
    logits_BWV = jnp.einsum("bwd,dv->bwv", x_BWD, head_DV.astype(dt),
                            preferred_element_type=jnp.float32)
    if cfg.scale_logits:
      logits_BWV = logits_BWV * (1.0 / jnp.sqrt(jnp.float32(cfg.d_model)))
    logits_BWV = self._constrain(logits_BWV, ("batch", "length", "vocab"))
    return logits_BWV, (KVCache(*kv) if return_kv else None)

  def forward(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None
              ) -> jax.Array:
    """Traceable forward pass (call it inside your own jit): -> logits [B, L, V] float32."""
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=False)[0]

  def forward_with_cache(self, input_ids_BL: jax.Array,
                         attention_mask_BL: jax.Array | None = None
                         ) -> tuple[jax.Array, KVCache]:
    """Full forward that also returns every layer's keys (after RoPE) and values."""
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=True)

  def forward_window(self, window_ids_BW: jax.Array, start, cache: KVCache,
                     attention_mask_BS: jax.Array | None = None, fresh_from=None
                     ) -> tuple[jax.Array, KVCache]:
    """Positions start…start+W−1 only, attending to all S cached positions.

    The window's fresh keys/values replace the cache's rows there (returned
    cache); `start` may be traced; `attention_mask_BS` covers all S positions.
    With `fresh_from` (may be traced), window positions before it keep their
    cached keys/values in every layer: their own outputs are then meaningless,
    and positions from `fresh_from` on see exactly the cache there.
    -> (logits [B, W, V] float32, updated KVCache).
    """
    return self._run(window_ids_BW, attention_mask_BS, start, cache, return_kv=True,
                     fresh_from=fresh_from)

  def __call__(self, input_ids, attention_mask=None) -> jax.Array:
    """Jitted forward: int [B, L] (+ {0,1} mask [B, L]) -> float32 [B, L, V]."""
    graphdef, state = nnx.split(self)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return apply(graphdef, state, jnp.asarray(input_ids, jnp.int32), mask)

  def forward_hidden(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None
                     ) -> jax.Array:
    """`forward` up to the output head: final normed hidden states [B, L, D] (compute dtype).

    The logits are x_BLD @ `head_DV()` (float32 accumulation), times
    1/sqrt(d_model) when `scale_logits`; losses that chunk the vocabulary use this.
    """
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=False, head=False)[0]

  def head_DV(self) -> jax.Array:
    """The output head [D, V] (param dtype): `ff_out`, or the embedding transposed if tied."""
    return self.wte[...].T if self.config.weight_tying else self.ff_out[...]


@jax.jit  # graphdef is a static pytree node
def _apply(graphdef, state, input_ids_BL, attention_mask_BL):
  return nnx.merge(graphdef, state).forward(input_ids_BL, attention_mask_BL)


def apply(graphdef: nnx.GraphDef, state: nnx.State, input_ids_BL: jax.Array,
          attention_mask_BL: jax.Array | None = None) -> jax.Array:
  """Pure jitted forward on a split model: `graphdef, state = nnx.split(model)`."""
  return _apply(graphdef, state, input_ids_BL, attention_mask_BL)


def init(cfg: ModelConfig, seed: int = 0, **kwargs) -> Transformer:
  """A randomly initialised model (for training from scratch and tests)."""
  return Transformer(cfg, nnx.Rngs(params=seed), **kwargs)


def abstract(cfg: ModelConfig, **kwargs) -> Transformer:
  """The model with ShapeDtypeStruct leaves: no memory, for loading into."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0), **kwargs))
