"""The LLaDA Transformer in Flax NNX: bidirectional, LLaMA-style, no timestep.

Per block (pre-norm, SPEC §1):
  h = x + attn_out(Attn(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1))), n1 = attn_norm(x)
  y = h + ff_out(silu(ff_proj(n2)) * up_proj(n2)),                        n2 = ff_norm(h)
then `ln_f` and the output head (`ff_out`, or the embedding when tied).

Shapes: B batch, L length, D d_model, N heads, K kv heads, H head dim,
F mlp hidden, V embedding_size, Y layers. Layer weights are stacked on a
leading `layers` axis and run under `lax.scan` (one compiled layer).
The module knows logical axis names only; `sharding.py` maps them to the
active mesh (`sharding.activation_mesh`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from llada_jax import sharding
from llada_jax.config import ModelConfig
from llada_jax.layers import attention as attention_lib
from llada_jax.layers.attention import KVCache
from llada_jax.layers.masks import MASK_TYPES
from llada_jax.layers.mlp import swiglu
from llada_jax.layers.norms import rms_norm
from llada_jax.layers import params as params_lib
from llada_jax.layers.params import ParamSpec, make_param
from llada_jax.layers.rope import apply_rope, rope_tables, rope_tables_at

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
PARAMS = tuple(dataclasses.replace(spec, stack="Y") if spec.path.startswith("blocks/") else spec
               for spec in PARAMS)
# Logical axis names of every parameter (per layer; scanned ones get `layers` first).
PARAM_AXES = {spec.path: spec.axes for spec in PARAMS}


def dim_sizes(cfg: ModelConfig) -> dict[str, int]:
  """Size of each dimension letter used in `PARAMS`."""
  return {"D": cfg.d_model, "N": cfg.n_heads, "K": cfg.n_kv_heads, "H": cfg.head_dim,
          "F": cfg.mlp_hidden_size, "V": cfg.embedding_size, "Y": cfg.n_layers}


def layer_ids(cfg: ModelConfig) -> dict[str, list[int]]:
  """The model's layer indices of each layer stack of `PARAMS`."""
  return {"Y": list(range(cfg.n_layers))}


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
  """The table entries this config has (no `ff_out` head when weights are tied)."""
  return params_lib.present_specs(PARAMS, cfg)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter, keyed by path (stacked ones with their layers axis first)."""
  return params_lib.shapes(param_specs(cfg), dim_sizes(cfg))


class Blocks(nnx.Module):
  """One group of layer weights ({name: nnx.Param}), stacked on a leading `layers` axis."""

  def __init__(self, params: dict[str, nnx.Param]):
    for name, param in params.items():
      setattr(self, name, param)


def dense_ffn(p: dict[str, jax.Array], n_BWD: jax.Array, cfg: ModelConfig,
              mask_BS: jax.Array | None):
  """The SwiGLU MLP of a dense layer -> ([B, W, D], {} no auxiliary losses)."""
  del cfg, mask_BS
  return swiglu(n_BWD, p["ff_proj"], p["up_proj"], p["ff_out"]), {}


def block_forward(p: dict[str, jax.Array], x_BWD: jax.Array, mask_BS: jax.Array | None,
                  sin_WH: jax.Array, cos_WH: jax.Array, cfg: ModelConfig,
                  kv_BSKH=None, start=0, fresh_from=None, ffn=dense_ffn, rows=None):
  """One pre-norm layer on per-layer weights `p` (compute dtype = x's).

  h = x + attention(attn_norm(x)), y = h + ffn(ff_norm(h)); `ffn` (p, n, cfg,
  mask) -> (out, aux losses) is the dense MLP here, a MoE in `llada_moe`.
  Cache and `rows` arguments as `layers.attention.self_attention` (with rows =
  (r0, Q), y holds positions r0…r0+Q−1 only); activations are constrained by
  logical names (`sharding.constrain`, the active mesh).
  -> (y [B, W, D], (k [B, S, K, H], v [B, S, K, H]), {aux loss name: []}).
  """
  n1_BWD = rms_norm(x_BWD, p["attn_norm"], cfg.rms_norm_eps)
  att_BWD, kv = attention_lib.self_attention(
      p, n1_BWD, mask_BS, sin_WH, cos_WH, impl=cfg.attention, eps=cfg.rms_norm_eps,
      kv_BSKH=kv_BSKH, start=start, fresh_from=fresh_from, rows=rows)
  if rows is not None:
    x_BWD = jax.lax.dynamic_slice_in_dim(x_BWD, rows[0], rows[1], axis=1)
  h_BWD = sharding.constrain(x_BWD + att_BWD, ("batch", "length", "embed"))
  n2_BWD = rms_norm(h_BWD, p["ff_norm"], cfg.rms_norm_eps)
  ffn_BWD, aux = ffn(p, n2_BWD, cfg, mask_BS)
  return sharding.constrain(h_BWD + ffn_BWD, ("batch", "length", "embed")), kv, aux


def _stacked(group: nnx.Module) -> dict[str, jax.Array]:
  """{name: array} of a `Blocks` group's parameters."""
  return {k: v[...] for k, v in vars(group).items() if isinstance(v, nnx.Param)}


# The most layer-weight bytes `segments_for_loop` copies into per-layer arrays (CPU).
UNSTACK_MAX_BYTES = 4 << 30


def _stack_length(weights: dict[str, jax.Array]) -> int:
  """n of weights stacked [n, ...]."""
  return next(iter(weights.values())).shape[0]


def _layer(weights, i: int) -> dict[str, jax.Array]:
  """Layer i's weights of a run: stacked {name: [n, ...]} or a list of per-layer dicts."""
  return weights[i] if isinstance(weights, list) else {k: v[i] for k, v in weights.items()}


def _unstack(runs):
  """`segments`-style runs with each run's weights as its list of per-layer dicts."""
  return [(block, [_layer(weights, i) for i in range(count)], first, count)
          for block, weights, first, count in runs]


class Transformer(nnx.Module):
  """The LLaDA mask predictor: token ids [B, L] -> float32 logits [B, L, V].

  The layers know logical axis names only: activations are constrained on the
  active `sharding.activation_mesh`. `mesh`/`rules` (static, optional; what
  `llada_jax.load(mesh=)` gives) make that the model's own mesh, entered around
  every forward; without them a forward traced under a caller's
  `activation_mesh` uses that one. Parameters carry logical names either way.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, mesh: Mesh | None = None,
               rules: Any = sharding.DEFAULT_RULES):
    self.config = cfg
    self.mesh = mesh
    self.rules = tuple(rules) if rules is not None else None
    dtype, sizes = DTYPES[cfg.param_dtype], self.family_sizes(cfg)
    made = {spec.path: make_param(spec, sizes, rngs, dtype)
            for spec in self.family_params(cfg)}
    for group in dict.fromkeys(k.split("/")[0] for k in made if "/" in k):
      setattr(self, group, Blocks({k.split("/", 1)[1]: v for k, v in made.items()
                                   if k.startswith(group + "/")}))
    for path, param in made.items():
      if "/" not in path:
        setattr(self, path, param)

  @classmethod
  def family_params(cls, cfg: ModelConfig) -> list[ParamSpec]:
    """The parameter table entries for `cfg` of the family module defining `cls`."""
    return sys.modules[cls.__module__].param_specs(cfg)

  @classmethod
  def family_sizes(cls, cfg: ModelConfig) -> dict[str, int]:
    """The sizes of that family table's dimension letters for `cfg`."""
    return sys.modules[cls.__module__].dim_sizes(cfg)

  def segments(self) -> list[tuple[Any, dict[str, jax.Array], int, int]]:
    """Runs of layers: (block function, {name: weights stacked [n, ...]}, first layer, n).

    Each run is one `lax.scan`; the dense LLaDA is one run of `block_forward`.
    """
    return [(block_forward, _stacked(self.blocks), 0, self.config.n_layers)]

  def unstacked_segments(self) -> list[tuple[Any, list[dict[str, jax.Array]], int, int]]:
    """`segments` with each run's weights as n per-layer dicts, for the forwards'
    `segments=` argument. A sampler makes them once, before its step loop: XLA:CPU
    copies a layer's weights out of the stacks at every read (the dots cannot read
    a slice in place), which inside the loop is a full weight copy per step. The
    unrolled layers then read the per-layer arrays directly (on CPU, memory for a
    second copy of the layer weights while the sampler runs)."""
    return _unstack(self.segments())

  def segments_for_loop(self):
    """`segments=` for forwards inside a loop: `unstacked_segments()` on CPU, made
    once where this is called, when the layer weights are at most
    `UNSTACK_MAX_BYTES` (their second copy must fit next to them); None otherwise
    (the stacks: TPU / GPU dots read them in place)."""
    runs = self.segments()
    size = sum(w.size * w.dtype.itemsize for _, run, _, _ in runs for w in run.values())
    if jax.default_backend() != "cpu" or size > UNSTACK_MAX_BYTES:
      return None
    return _unstack(runs)

  def _scan(self, block, weights, x_BWD, cache, count, mask_BS, sin_WH, cos_WH, start,
            return_kv, fresh_from):
    """The first `count` layers of `weights` (stacked [n ≥ count, ...], or a list of
    per-layer dicts: unrolled) -> (x, (k, v) [count, ...] or None, {aux: [count]})."""
    cfg = self.config

    def layer(x_BWD, xs):
      p, kv = xs
      y_BWD, kv, aux = block(p, x_BWD, mask_BS, sin_WH, cos_WH, cfg, kv, start, fresh_from)
      return y_BWD, (kv if return_kv else None, aux)

    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
    if isinstance(weights, list) or not cfg.scan_layers:  # unrolled
      outs = []
      for i in range(count):
        x_BWD, out_i = layer(x_BWD, (_layer(weights, i), jax.tree.map(lambda a, i=i: a[i], cache)))
        outs.append(out_i)
      kv, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
      return x_BWD, kv, aux
    xs = (weights, cache)
    if count == _stack_length(weights):
      x_BWD, (kv, aux) = jax.lax.scan(layer, x_BWD, xs)
      return x_BWD, kv, aux

    def layer_at(x_BWD, i):  # the first `count` layers of the stacks, indexed in place (no copy)
      return layer(x_BWD, jax.tree.map(
          lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs))
    x_BWD, (kv, aux) = jax.lax.scan(layer_at, x_BWD, jnp.arange(count))
    return x_BWD, kv, aux

  def _run(self, ids_BW, mask_BS, start, cache: KVCache | None, return_kv: bool,
           fresh_from=None, head: bool = True, positions_W=None, embed_noise_BWD=None,
           rows=None, segments=None):
    """Embed -> runs of scanned layers -> ln_f -> head, for positions start…start+W−1
    (or the RoPE positions `positions_W` [W]; `embed_noise_BWD` is added to the embeddings).
    rows = (r0, Q) (no cache; r0 may be traced): outputs of positions r0…r0+Q−1
    of the window only — the last layer runs its queries, attention and FFN on
    them alone (every position's keys/values, so the same values as slicing).
    segments: `unstacked_segments()` made once outside a loop (default `segments()`).

    -> (logits [B, W, V] float32, KVCache or None, {aux loss: [] summed over layers});
    `head=False` stops after ln_f: hidden states [B, W, D] in place of the logits.
    """
    with self.activation_mesh():
      return self._layers(ids_BW, mask_BS, start, cache, return_kv, fresh_from, head,
                          positions_W, embed_noise_BWD, rows, segments)

  def activation_mesh(self):
    """The model's own mesh as the `sharding.activation_mesh` (else the caller's)."""
    if self.mesh is None or self.rules is None:
      return contextlib.nullcontext()
    return sharding.activation_mesh(self.mesh, self.rules)

  def _layers(self, ids_BW, mask_BS, start, cache, return_kv, fresh_from, head,
              positions_W=None, embed_noise_BWD=None, rows=None, segments=None):
    cfg = self.config
    if rows is not None and cache is not None:
      raise ValueError("rows: only a forward without a cache runs part of the last layer")
    if rows is not None and isinstance(mask_BS, MASK_TYPES):
      raise ValueError(f"rows: a {type(mask_BS).__name__} mask is per query; rows needs "
                       "a [B, S] key mask or None")
    dt = DTYPES[cfg.dtype]
    ids_BW = jnp.asarray(ids_BW, jnp.int32)
    x_BWD = jnp.take(self.wte[...], ids_BW, axis=0).astype(dt)
    if embed_noise_BWD is not None:
      x_BWD = x_BWD + embed_noise_BWD.astype(dt)
    x_BWD = sharding.constrain(x_BWD, ("batch", "length", "embed"))
    if positions_W is None:
      sin_WR, cos_WR = rope_tables(ids_BW.shape[1], cfg.rotary_dim, cfg.rope_theta, start)
    else:
      sin_WR, cos_WR = rope_tables_at(positions_W, cfg.rotary_dim, cfg.rope_theta)
    if mask_BS is not None and not isinstance(mask_BS, MASK_TYPES):
      mask_BS = jnp.asarray(mask_BS)
    kvs, aux = [], {}

    def add_aux(losses, per_layer: bool):
      for name, value in losses.items():
        aux[name] = aux.get(name, 0.0) + (jnp.sum(value, axis=0) if per_layer else value)

    runs = self.segments() if segments is None else segments
    for n, (block, weights, first, count) in enumerate(runs):
      cache_run = None if cache is None else (cache.k_YBSKH[first:first + count],
                                              cache.v_YBSKH[first:first + count])
      last_on_rows = rows is not None and n == len(runs) - 1
      scanned = count - 1 if last_on_rows else count
      if scanned:
        x_BWD, kv, aux_run = self._scan(block, weights, x_BWD, cache_run, scanned, mask_BS,
                                        sin_WR, cos_WR, start, return_kv, fresh_from)
        kvs.append(kv)
        add_aux(aux_run, per_layer=True)
      if last_on_rows:  # the last layer: queries, attention and FFN of `rows` only
        x_BWD, kv, aux_last = block(_layer(weights, count - 1), x_BWD, mask_BS, sin_WR, cos_WR,
                                    cfg, rows=rows)
        kvs.append(jax.tree.map(lambda a: a[None], kv) if return_kv else None)
        add_aux(aux_last, per_layer=False)
    x_BWD = rms_norm(x_BWD, self.ln_f[...], cfg.rms_norm_eps)
    kv = None
    if return_kv:
      kv = KVCache(*(jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
                     for parts in zip(*kvs))).constrained()
    return (self.head_logits(x_BWD) if head else x_BWD), kv, aux

  def head_logits(self, x_BWD: jax.Array) -> jax.Array:
    """Final normed hidden states [B, W, D] -> float32 logits [B, W, V] (the output head)."""
    cfg = self.config
    logits_BWV = jnp.einsum("bwd,dv->bwv", x_BWD, self.head_DV().astype(DTYPES[cfg.dtype]),
                            preferred_element_type=jnp.float32)
    if cfg.scale_logits:
      logits_BWV = logits_BWV * (1.0 / jnp.sqrt(jnp.float32(cfg.d_model)))
    with self.activation_mesh():
      return sharding.constrain(logits_BWV, ("batch", "length", "vocab"))

  def forward(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None
              ) -> jax.Array:
    """Traceable forward pass (call it inside your own jit): -> logits [B, L, V] float32."""
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=False)[0]

  def forward_with_aux(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None,
                       head: bool = True, *, positions_L: jax.Array | None = None,
                       embed_noise_BLD: jax.Array | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward that also returns the auxiliary training losses ({} for dense models;
    MoE: load_balancing_loss and router_z_loss, summed over layers). `head=False`:
    the final normed hidden states [B, L, D] in place of the logits (as `forward_hidden`).

    For training objectives: `attention_mask_BL` may be a `layers.masks` mask
    (e.g. `BlockDiffusion`), `positions_L` int [L] the RoPE positions (default
    0…L−1), `embed_noise_BLD` a perturbation added to the token embeddings."""
    out, _, aux = self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=False,
                            head=head, positions_W=positions_L,
                            embed_noise_BWD=embed_noise_BLD)
    return out, aux

  def forward_with_cache(self, input_ids_BL: jax.Array,
                         attention_mask_BL: jax.Array | None = None, head: bool = True,
                         rows=None, segments=None) -> tuple[jax.Array, KVCache]:
    """Full forward that also returns every layer's keys (after RoPE) and values.
    `head=False`: the final normed hidden states in place of the logits (`head_logits`);
    `rows`, `segments` as `forward_hidden` (the cache still covers every position)."""
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=True, head=head,
                     rows=rows, segments=segments)[:2]

  def forward_window(self, window_ids_BW: jax.Array, start, cache: KVCache,
                     attention_mask_BS: jax.Array | None = None, fresh_from=None,
                     head: bool = True, segments=None) -> tuple[jax.Array, KVCache]:
    """Positions start…start+W−1 only, attending to all S cached positions.

    The window's fresh keys/values replace the cache's rows there (returned
    cache); `start` may be traced; `attention_mask_BS` covers all S positions.
    With `fresh_from` (may be traced), window positions before it keep their
    cached keys/values in every layer: their own outputs are then meaningless,
    and positions from `fresh_from` on see exactly the cache there.
    `segments` as `forward_hidden`.
    -> (logits [B, W, V] float32 (hidden states with `head=False`), updated KVCache).
    """
    return self._run(window_ids_BW, attention_mask_BS, start, cache, return_kv=True,
                     fresh_from=fresh_from, head=head, segments=segments)[:2]

  def __call__(self, input_ids, attention_mask=None) -> jax.Array:
    """Jitted forward: int [B, L] (+ {0,1} mask [B, L]) -> float32 [B, L, V]."""
    graphdef, state = nnx.split(self)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return apply(graphdef, state, jnp.asarray(input_ids, jnp.int32), mask)

  def forward_hidden(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None,
                     rows=None, segments=None) -> jax.Array:
    """`forward` up to the output head: final normed hidden states [B, L, D] (compute dtype).

    The logits are `head_logits` of it: x_BLD @ `head_DV()` (float32 accumulation),
    times 1/sqrt(d_model) when `scale_logits`; losses that chunk the vocabulary use this.
    rows = (r0, Q) (r0 may be traced): positions r0…r0+Q−1 only, [B, Q, D], at the
    cost of the last layer on Q queries (what a sampler step needs of the canvas).
    segments: `unstacked_segments()`, made once before a loop of forwards (else the stacks).
    """
    return self._run(input_ids_BL, attention_mask_BL, 0, None, return_kv=False, head=False,
                     rows=rows, segments=segments)[0]

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
