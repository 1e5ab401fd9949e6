"""Mixture-of-experts feed-forward: routers, dropless grouped experts, expert parallelism.

Shapes: T tokens (batch and length flattened), D d_model, E experts, K experts per
token, F expert hidden size, S = T*K token-slots, R rows of an expert-sorted buffer,
N row tiles of that buffer, X expert-parallel shards.

Experts are SwiGLU MLPs stacked on a leading `experts` axis,
  y_e(x) = down_e(silu(gate_e x) * up_e x),   y_t = sum_k w_tk y_{e_tk}(x_t),
with combine weights w and expert ids e from a float32 router:
  route_softmax_biased   LLaDA-MoE: top-k of softmax + expert_bias (weights keep the bias)
  route_sigmoid_grouped  LLaDA2.x: DeepSeek-V3 group-limited top-k of sigmoid + bias,
                         weights = unbiased scores renormalised, times a scale.
`expert_ffn` is dropless: token-slots are sorted by expert and each expert runs on
its own rows only, either with `jax.lax.ragged_dot` (native on TPU) or with a loop
over row tiles of one expert each, several tiles a step ("tiled"; XLA:CPU lowers
ragged_dot to one dense masked matmul per expert, so its cost grows with E). `expert_ffn_dense` (every expert on every token)
is the reference. `expert_ffn_sharded` runs under `jax.shard_map`: experts sharded
over the mesh axes of the logical `experts` axis, tokens sent to their experts and
back by `all_to_all` with a static, dropless buffer of S rows per destination shard.
`moe_layer` puts router, experts and the training losses together.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from llada_jax import sharding

# Logical axis names of a MoE layer's parameters (a scanned stack adds `layers` first).
# The router is replicated over experts: it is small and top-k needs all E scores.
PARAM_AXES = {
    "router": ("embed", None),
    "expert_bias": (None,),
    "gate_proj": ("experts", "embed", "mlp"),
    "up_proj": ("experts", "embed", "mlp"),
    "down_proj": ("experts", "mlp", "embed"),
}

ROUTERS = ("softmax_biased", "sigmoid_grouped")
IMPLS = ("auto", "tiled", "ragged_dot", "dense")
# Rows per step of the tiled path's loop: small tiles are batched up to this many
# rows, in at most MAX_TILES_PER_STEP tiles (each is an unrolled slice in the step).
STEP_ROWS, MAX_TILES_PER_STEP = 512, 16
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Routing and expert settings of one MoE layer (static under jit).

  router: "softmax_biased" (LLaDA-MoE) or "sigmoid_grouped" (LLaDA2.x; uses
  n_group, topk_group, routed_scaling_factor, norm_topk_prob). impl: "auto"
  (ragged_dot on TPU, tiled elsewhere), "tiled", "ragged_dot" or "dense".
  tile, tiles_per_step: rows per tile and tiles per loop step of the tiled path
  (None: `default_tile`, up to STEP_ROWS rows a step).
  """
  num_experts: int
  k: int
  router: str = "softmax_biased"
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = True
  impl: str = "auto"
  tile: int | None = None
  tiles_per_step: int | None = None

  def __post_init__(self):
    if self.router not in ROUTERS:
      raise ValueError(f"MoEConfig.router={self.router!r}: expected one of {ROUTERS}")
    if self.impl not in IMPLS:
      raise ValueError(f"MoEConfig.impl={self.impl!r}: expected one of {IMPLS}")
    _check_k(self.k, self.num_experts)
    if self.router == "sigmoid_grouped":
      _check_groups(self.num_experts, self.k, self.n_group, self.topk_group)


class MoEAux(NamedTuple):
  """What a MoE layer returns besides its output (float32)."""
  load_balancing_loss: jax.Array  # [] E * sum_e f_e P_e (1 when balanced)
  router_z_loss: jax.Array        # [] mean logsumexp(router logits)^2
  tokens_per_expert_E: jax.Array  # [E] real-token slots routed to each expert


def _check_k(k: int, num_experts: int) -> None:
  if not 1 <= k <= num_experts:
    raise ValueError(f"top-k k={k} must be in [1, num_experts={num_experts}]")


def _check_groups(num_experts: int, k: int, n_group: int, topk_group: int) -> None:
  if n_group < 1 or num_experts % n_group:
    raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
  if n_group > 1 and num_experts // n_group < 2:
    raise ValueError(f"n_group={n_group}: groups of {num_experts // n_group} expert; the "
                     "group score sums the top-2 scores of a group, so groups need >= 2")
  if not 1 <= topk_group <= n_group:
    raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
  if k > topk_group * (num_experts // n_group):
    raise ValueError(f"k={k} exceeds the {topk_group * (num_experts // n_group)} experts "
                     f"of the topk_group={topk_group} kept groups")


# ----------------------------------------------------------------------------- routers


def router_logits(x_TD: jax.Array, router_DE: jax.Array) -> jax.Array:
  """float32 router logits [T, E] (full float32 matmul precision, also on TPU)."""
  return jnp.dot(x_TD.astype(_F32), router_DE.astype(_F32),
                 precision=jax.lax.Precision.HIGHEST)


def route_softmax_biased(router_logits_TE: jax.Array, expert_bias_E: jax.Array | None,
                         k: int) -> tuple[jax.Array, jax.Array]:
  """LLaDA-MoE routing -> (weights [T, K] float32, expert ids [T, K] int32).

  p = softmax(logits) + expert_bias; (w, ids) = top-k of p, descending. The
  weights are those biased probabilities, not renormalised.
  """
  _check_k(k, router_logits_TE.shape[-1])
  probs_TE = jax.nn.softmax(router_logits_TE.astype(_F32), axis=-1)
  if expert_bias_E is not None:
    probs_TE = probs_TE + expert_bias_E.astype(_F32)
  return jax.lax.top_k(probs_TE, k)


def route_sigmoid_grouped(router_logits_TE: jax.Array, expert_bias_E: jax.Array | None,
                          k: int, n_group: int, topk_group: int,
                          routed_scaling_factor: float, norm_topk_prob: bool = True
                          ) -> tuple[jax.Array, jax.Array]:
  """LLaDA2.x routing -> (weights [T, K] float32, expert ids [T, K] int32).

  s = sigmoid(logits), b = s + expert_bias (the bias only selects). Group score
  = sum of the top-2 b of each of the n_group groups; outside the topk_group best
  groups b = -inf; ids = top-k of b, descending. Weights = s[ids], divided by
  (their sum + 1e-20) when norm_topk_prob and k > 1 (the released code always
  does this for k > 1), times routed_scaling_factor.
  """
  T, E = router_logits_TE.shape
  _check_k(k, E)
  _check_groups(E, k, n_group, topk_group)
  scores_TE = jax.nn.sigmoid(router_logits_TE.astype(_F32))
  choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E.astype(_F32)
  if n_group > 1:
    top2_TG2, _ = jax.lax.top_k(choice_TE.reshape(T, n_group, E // n_group), 2)
    _, groups_TH = jax.lax.top_k(top2_TG2.sum(-1), topk_group)
    keep_TG = jnp.any(groups_TH[:, :, None] == jnp.arange(n_group), axis=1)
    keep_TE = jnp.repeat(keep_TG, E // n_group, axis=1)
    choice_TE = jnp.where(keep_TE, choice_TE, -jnp.inf)
  _, ids_TK = jax.lax.top_k(choice_TE, k)
  weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=1)
  if norm_topk_prob and k > 1:
    weights_TK = weights_TK / (weights_TK.sum(-1, keepdims=True) + 1e-20)
  return weights_TK * routed_scaling_factor, ids_TK


def route(router_logits_TE: jax.Array, expert_bias_E: jax.Array | None, cfg: MoEConfig
          ) -> tuple[jax.Array, jax.Array]:
  """The router `cfg.router` names -> (weights [T, K], expert ids [T, K])."""
  if cfg.router == "softmax_biased":
    return route_softmax_biased(router_logits_TE, expert_bias_E, cfg.k)
  return route_sigmoid_grouped(router_logits_TE, expert_bias_E, cfg.k, cfg.n_group,
                               cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob)


def router_probs(router_logits_TE: jax.Array, router: str) -> jax.Array:
  """Per-token expert probabilities [T, E] for the balance loss: softmax, or the
  sigmoid scores normalised to sum 1 (DeepSeek-V3's sequence-wise balance loss)."""
  logits_TE = router_logits_TE.astype(_F32)
  if router == "softmax_biased":
    return jax.nn.softmax(logits_TE, axis=-1)
  scores_TE = jax.nn.sigmoid(logits_TE)
  return scores_TE / scores_TE.sum(-1, keepdims=True)


# ----------------------------------------------------------------------- training losses


def _token_weights(mask_T: jax.Array | None, T: int) -> tuple[jax.Array, jax.Array]:
  m_T = jnp.ones((T,), _F32) if mask_T is None else mask_T.reshape(T).astype(_F32)
  return m_T, jnp.maximum(m_T.sum(), 1.0)


def tokens_per_expert(expert_ids_TK: jax.Array, num_experts: int,
                      mask_T: jax.Array | None = None) -> jax.Array:
  """float32 [E]: token-slots routed to each expert (tokens with mask 0 excluded)."""
  T, K = expert_ids_TK.shape
  m_T, _ = _token_weights(mask_T, T)
  return jnp.zeros((num_experts,), _F32).at[expert_ids_TK].add(
      jnp.broadcast_to(m_T[:, None], (T, K)))


def load_balancing_loss(probs_TE: jax.Array, expert_ids_TK: jax.Array,
                        mask_T: jax.Array | None = None) -> jax.Array:
  """Switch/GShard balance loss E * sum_e f_e P_e (1 when perfectly balanced).

  f_e: fraction of the T*K selected token-slots that go to expert e (no
  gradient); P_e: mean router probability of e. mask_T (1 = real token)
  restricts both means to real tokens.
  """
  T, E = probs_TE.shape
  m_T, n = _token_weights(mask_T, T)
  f_E = tokens_per_expert(expert_ids_TK, E, mask_T) / (n * expert_ids_TK.shape[1])
  p_E = (probs_TE.astype(_F32) * m_T[:, None]).sum(0) / n
  return E * jnp.sum(f_E * p_E)


def router_z_loss(router_logits_TE: jax.Array, mask_T: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over (real) tokens of logsumexp(logits)^2."""
  m_T, n = _token_weights(mask_T, router_logits_TE.shape[0])
  lse_T = jax.nn.logsumexp(router_logits_TE.astype(_F32), axis=-1)
  return jnp.sum(m_T * lse_T ** 2) / n


# ---------------------------------------------------------------------------- experts


def expert_ffn_dense(x_TD: jax.Array, weights_TK: jax.Array, expert_ids_TK: jax.Array,
                     gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array) -> jax.Array:
  """Reference: every expert on every token, combined with the (masked) weights.

  Costs E/K times the routed compute. Ids outside [0, E) contribute nothing.
  """
  dt = x_TD.dtype
  combine_TE = jnp.sum(jax.nn.one_hot(expert_ids_TK, gate_EDF.shape[0], dtype=_F32)
                       * weights_TK.astype(_F32)[..., None], axis=1)
  gate_TEF = jnp.einsum("td,edf->tef", x_TD, gate_EDF.astype(dt))
  up_TEF = jnp.einsum("td,edf->tef", x_TD, up_EDF.astype(dt))
  y_TED = jnp.einsum("tef,efd->ted", jax.nn.silu(gate_TEF) * up_TEF, down_EFD.astype(dt))
  return jnp.sum(y_TED.astype(_F32) * combine_TE[..., None], axis=1).astype(dt)


def resolve_tiling(rows: int, num_experts: int, tile: int | None = None,
                   tiles_per_step: int | None = None) -> tuple[int, int]:
  """(tile, tiles_per_step) of the tiled path for about `rows` routed rows; None:
  `default_tile`, and up to STEP_ROWS rows a step."""
  tile = tile or default_tile(rows, num_experts)
  return tile, tiles_per_step or min(MAX_TILES_PER_STEP, max(1, STEP_ROWS // tile))


def default_tile(rows: int, num_experts: int) -> int:
  """Rows per tile of the tiled path: the power of two nearest below rows/(2E), in
  [8, 512]. Each expert pads its rows to a whole tile (about E*tile/2 rows in all,
  <= a quarter of `rows`), and bigger tiles make faster matmuls."""
  target = max(1, rows // (2 * num_experts))
  return int(min(512, max(8, 2 ** int(math.log2(target)))))


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """"auto" -> "ragged_dot" on TPU (native grouped matmul), "tiled" elsewhere.

  platform: the compile target ("tpu", "cpu", ...); None = `jax.default_backend()`
  (an AOT compile for TPU from a CPU host passes "tpu").
  """
  if impl not in IMPLS:
    raise ValueError(f"MoE impl={impl!r}: expected one of {IMPLS}")
  if impl == "auto":
    return "ragged_dot" if (platform or jax.default_backend()) == "tpu" else "tiled"
  return impl


def _sort_ranks(group_S: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(sizes [G], rank [S]): elements per group and each element's rank in its group
  (stable). Elements with group == num_groups belong to none (rank unspecified)."""
  S = group_S.shape[0]
  order_S = jnp.argsort(group_S, stable=True)
  sizes_G = jnp.zeros((num_groups,), jnp.int32).at[group_S].add(1, mode="drop")
  starts_G1 = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes_G)])
  rank_sorted_S = jnp.arange(S, dtype=jnp.int32) - starts_G1[group_S[order_S]]
  return sizes_G, jnp.zeros((S,), jnp.int32).at[order_S].set(rank_sorted_S)


class _Plan(NamedTuple):
  """Expert-sorted buffer of R rows: each expert's slots in a run of whole tiles."""
  pos_S: jax.Array          # int32 [S] row of each slot (>= R: routed nowhere)
  src_R: jax.Array          # int32 [R] slot in each row (S: padding row)
  group_sizes_E: jax.Array  # int32 [E] slots per expert
  tile_expert_N: jax.Array  # int32 [N] expert of each tile
  n_tiles: jax.Array        # int32 [] tiles holding slots (the rest are padding)


def _max_tiles(slots: int, num_experts: int, tile: int) -> int:
  """Static bound on sum_e ceil(size_e / tile) when the sizes sum to <= slots."""
  return (slots + num_experts * (tile - 1)) // tile


def _plan(expert_S: jax.Array, num_experts: int, tile: int, per_step: int = 1) -> _Plan:
  """Layout of S slots (expert_S == num_experts: none) sorted by expert, each
  expert's run padded to a multiple of `tile` (tile 1: plain sort, R = S); the
  buffer holds a whole number of per_step tiles."""
  S, E = expert_S.shape[0], num_experts
  R = tile * per_step * -(-_max_tiles(S, E, tile) // per_step)
  sizes_E, rank_S = _sort_ranks(expert_S, E)
  padded_E = -(-sizes_E // tile) * tile
  ends_E = jnp.cumsum(padded_E)
  starts_E1 = jnp.concatenate([ends_E - padded_E, jnp.full((1,), R, jnp.int32)])
  arange_S = jnp.arange(S, dtype=jnp.int32)
  pos_S = jnp.where(expert_S < E, starts_E1[expert_S] + rank_S, R + arange_S)
  src_R = jnp.full((R,), S, jnp.int32).at[pos_S].set(arange_S, mode="drop")
  tile_expert_N = jnp.minimum(
      jnp.searchsorted(ends_E, jnp.arange(R // tile) * tile, side="right"), E - 1)
  return _Plan(pos_S, src_R, sizes_E, tile_expert_N.astype(jnp.int32), ends_E[-1] // tile)


def _swiglu_tiles(x_BMD, gate_BDF, up_BDF, down_BFD):
  dt = x_BMD.dtype
  h_BMF = (jax.nn.silu(jnp.einsum("bmd,bdf->bmf", x_BMD, gate_BDF.astype(dt)))
           * jnp.einsum("bmd,bdf->bmf", x_BMD, up_BDF.astype(dt)))
  return jnp.einsum("bmf,bfd->bmd", h_BMF, down_BFD.astype(dt))


def _varying_axes(a: jax.Array) -> frozenset[str]:
  """shard_map axes along which `a` varies (empty outside shard_map)."""
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):  # older JAX
    return frozenset(aval.vma)
  return frozenset(getattr(getattr(aval, "manual_axis_type", None), "varying", ()))


def _zeros_carry(shape, dtype, *like: jax.Array) -> jax.Array:
  """Zeros varying over every shard_map axis that `like` vary over (a loop carry
  must keep its type); plain zeros outside shard_map."""
  zeros = jnp.zeros(shape, dtype)
  axes = frozenset().union(*(_varying_axes(a) for a in like))
  return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _sum_to_varying(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Cotangent summed over the shard_map axes along which `primal` is replicated
  (what autodiff does for a value used on every shard)."""
  extra = _varying_axes(ct) - _varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _step(tile_expert_N, x_RD, j, tile, per_step):
  """Step j of the tile loop: (experts [B], rows [B, M, D]) of its per_step tiles."""
  e_B = jax.lax.dynamic_slice_in_dim(tile_expert_N, j * per_step, per_step)
  rows_BMD = jax.lax.dynamic_slice_in_dim(x_RD, j * per_step * tile, per_step * tile)
  return e_B, rows_BMD.reshape(per_step, tile, -1)


def _take(w_EAB: jax.Array, e_B: jax.Array) -> jax.Array:
  """w[e_B] [B, A, B'] as B dynamic slices (XLA:CPU's gather of whole windows is slow)."""
  return jnp.stack([jax.lax.dynamic_index_in_dim(w_EAB, e_B[b], keepdims=False)
                    for b in range(e_B.shape[0])])


def _add_at(acc_EAB: jax.Array, e_B: jax.Array, update_BAB: jax.Array) -> jax.Array:
  """acc[e_B[b]] += update[b], one in-place slice update per b (XLA:CPU's scatter
  of whole windows is far slower)."""
  for b in range(e_B.shape[0]):
    old_AB = jax.lax.dynamic_index_in_dim(acc_EAB, e_B[b], keepdims=False)
    acc_EAB = jax.lax.dynamic_update_index_in_dim(acc_EAB, old_AB + update_BAB[b], e_B[b], 0)
  return acc_EAB


def _put(acc_RD, j, rows_BMD):
  rows_MD = rows_BMD.reshape(-1, rows_BMD.shape[-1])
  return jax.lax.dynamic_update_slice_in_dim(acc_RD, rows_MD.astype(acc_RD.dtype),
                                             j * rows_MD.shape[0], 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _tiled_ffn(x_RD, tile_expert_N, n_tiles, gate_EDF, up_EDF, down_EFD, tile, per_step):
  """SwiGLU experts on a tile-padded buffer: y[tile n] = expert tile_expert_N[n] of
  x[tile n] for the first n_tiles tiles (the rest: 0), per_step tiles a loop step
  (batched matmuls amortise the per-step cost when tiles are small)."""
  def body(j, y_RD):
    e_B, x_BMD = _step(tile_expert_N, x_RD, j, tile, per_step)
    return _put(y_RD, j, _swiglu_tiles(x_BMD, *(_take(w, e_B) for w in (gate_EDF, up_EDF,
                                                                        down_EFD))))
  like = (x_RD, tile_expert_N, gate_EDF, up_EDF, down_EFD)
  steps = (n_tiles + per_step - 1) // per_step
  return jax.lax.fori_loop(0, steps, body, _zeros_carry(x_RD.shape, x_RD.dtype, *like))


def _tiled_ffn_fwd(x_RD, tile_expert_N, n_tiles, gate_EDF, up_EDF, down_EFD, tile, per_step):
  y_RD = _tiled_ffn(x_RD, tile_expert_N, n_tiles, gate_EDF, up_EDF, down_EFD, tile, per_step)
  return y_RD, (x_RD, tile_expert_N, n_tiles, gate_EDF, up_EDF, down_EFD)


def _tiled_ffn_bwd(tile, per_step, res, dy_RD):
  """Per step: recompute the hidden activations, then dx and the weight gradients
  of its tiles' experts (accumulated in float32 into those experts' slices)."""
  x_RD, tile_expert_N, n_tiles, gate_EDF, up_EDF, down_EFD = res
  dt = x_RD.dtype
  outer = functools.partial(jnp.einsum, preferred_element_type=_F32)
  def body(j, carry):
    dx_RD, dgate_EDF, dup_EDF, ddown_EFD = carry
    e_B, x_BMD = _step(tile_expert_N, x_RD, j, tile, per_step)
    _, dy_BMD = _step(tile_expert_N, dy_RD, j, tile, per_step)
    gate_BDF, up_BDF, down_BFD = (_take(w, e_B).astype(dt) for w in (gate_EDF, up_EDF, down_EFD))
    g_BMF = jnp.einsum("bmd,bdf->bmf", x_BMD, gate_BDF)
    u_BMF = jnp.einsum("bmd,bdf->bmf", x_BMD, up_BDF)
    sig_BMF = jax.nn.sigmoid(g_BMF)
    act_BMF = g_BMF * sig_BMF
    dh_BMF = jnp.einsum("bmd,bfd->bmf", dy_BMD, down_BFD)
    du_BMF = dh_BMF * act_BMF
    dg_BMF = dh_BMF * u_BMF * (sig_BMF * (1 + g_BMF * (1 - sig_BMF)))
    ddown_EFD = _add_at(ddown_EFD, e_B, outer("bmf,bmd->bfd", act_BMF * u_BMF, dy_BMD))
    dgate_EDF = _add_at(dgate_EDF, e_B, outer("bmd,bmf->bdf", x_BMD, dg_BMF))
    dup_EDF = _add_at(dup_EDF, e_B, outer("bmd,bmf->bdf", x_BMD, du_BMF))
    dx_BMD = (jnp.einsum("bmf,bdf->bmd", dg_BMF, gate_BDF)
              + jnp.einsum("bmf,bdf->bmd", du_BMF, up_BDF))
    return _put(dx_RD, j, dx_BMD), dgate_EDF, dup_EDF, ddown_EFD
  like = (x_RD, dy_RD, tile_expert_N, gate_EDF, up_EDF, down_EFD)
  zeros = [_zeros_carry(w.shape, _F32, *like) for w in (gate_EDF, up_EDF, down_EFD)]
  steps = (n_tiles + per_step - 1) // per_step
  dx_RD, dgate, dup, ddown = jax.lax.fori_loop(
      0, steps, body, (_zeros_carry(x_RD.shape, x_RD.dtype, *like), *zeros))
  grads = [_sum_to_varying(ct.astype(p.dtype), p)
           for ct, p in ((dx_RD, x_RD), (dgate, gate_EDF), (dup, up_EDF), (ddown, down_EFD))]
  return grads[0], None, None, *grads[1:]


_tiled_ffn.defvjp(_tiled_ffn_fwd, _tiled_ffn_bwd)


def _grouped_ffn(x_ND: jax.Array, expert_S: jax.Array, gate_EDF, up_EDF, down_EFD,
                 impl: str, tiling: tuple[int, int], slots_per_row: int = 1) -> jax.Array:
  """Unweighted expert outputs [S, D]: slot s = expert expert_S[s] (== E: none,
  output 0) on row s // slots_per_row of x_ND. Dropless: every slot is computed.
  tiling: the tiled path's (tile, tiles_per_step); ragged_dot sorts without padding."""
  if impl == "dense":
    x_SD = x_ND[jnp.arange(expert_S.shape[0]) // slots_per_row]
    return expert_ffn_dense(x_SD, jnp.ones(expert_S.shape + (1,), _F32), expert_S[:, None],
                            gate_EDF, up_EDF, down_EFD)
  E = gate_EDF.shape[0]
  tile, per_step = (1, 1) if impl == "ragged_dot" else tiling
  per_step = min(per_step, _max_tiles(expert_S.shape[0], E, tile))  # small inputs: fewer
  plan = _plan(expert_S, E, tile, per_step)
  x_RD = x_ND.at[plan.src_R // slots_per_row].get(mode="fill", fill_value=0)
  if impl == "ragged_dot":
    dt, sizes_E = x_RD.dtype, plan.group_sizes_E
    h_RF = (jax.nn.silu(jax.lax.ragged_dot(x_RD, gate_EDF.astype(dt), sizes_E))
            * jax.lax.ragged_dot(x_RD, up_EDF.astype(dt), sizes_E))
    y_RD = jax.lax.ragged_dot(h_RF, down_EFD.astype(dt), sizes_E)
  else:
    y_RD = _tiled_ffn(x_RD, plan.tile_expert_N, plan.n_tiles, gate_EDF, up_EDF, down_EFD, tile,
                      per_step)
  return y_RD.at[plan.pos_S].get(mode="fill", fill_value=0)


def _combine(y_SD: jax.Array, weights_TK: jax.Array, dtype) -> jax.Array:
  """sum_k w_tk y_(t,k) in float32 -> [T, D] of `dtype`."""
  T, K = weights_TK.shape
  y_TKD = y_SD.reshape(T, K, -1).astype(_F32)
  return jnp.sum(y_TKD * weights_TK.astype(_F32)[..., None], axis=1).astype(dtype)


def expert_ffn(x_TD: jax.Array, weights_TK: jax.Array, expert_ids_TK: jax.Array,
               gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *,
               impl: str = "auto", tile: int | None = None,
               tiles_per_step: int | None = None) -> jax.Array:
  """Routed SwiGLU experts, dropless: y_t = sum_k w_tk expert_{e_tk}(x_t) -> [T, D].

  Compute dtype = x's; the combine is float32. Ids outside [0, E) contribute 0.
  impl: see `resolve_impl`; "dense" = `expert_ffn_dense`. tile, tiles_per_step:
  the tiled path's rows per tile and tiles per loop step (None: automatic).
  """
  impl = resolve_impl(impl)
  if impl == "dense":
    return expert_ffn_dense(x_TD, weights_TK, expert_ids_TK, gate_EDF, up_EDF, down_EFD)
  E, K = gate_EDF.shape[0], expert_ids_TK.shape[1]
  expert_S = _none_if_outside(expert_ids_TK.reshape(-1), E)
  tiling = resolve_tiling(expert_S.shape[0], E, tile, tiles_per_step)
  y_SD = _grouped_ffn(x_TD, expert_S, gate_EDF, up_EDF, down_EFD, impl, tiling, slots_per_row=K)
  return _combine(y_SD, weights_TK, x_TD.dtype)


def _none_if_outside(expert_S: jax.Array, num_experts: int) -> jax.Array:
  expert_S = expert_S.astype(jnp.int32)
  return jnp.where((expert_S >= 0) & (expert_S < num_experts), expert_S, num_experts)


# ------------------------------------------------------------------ expert parallelism


def _mesh_axes(target: Any, mesh: Mesh) -> tuple[str, ...]:
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def _size(mesh: Mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def expert_parallel_layout(mesh: Mesh, rules: sharding.Rules, num_tokens: int,
                           num_experts: int, mlp: int
                           ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(token axes, expert axes, tensor axes) of `expert_ffn_sharded` on `mesh`.

  Experts go over the mesh axes of logical `experts`, the expert hidden size
  over those of `mlp`, tokens over those of `batch` plus the expert axes. A
  size that does not divide its axes is replicated instead, with a warning
  (tokens first drop the expert axes, then all axes).
  """
  table = dict(rules)
  expert_axes = _mesh_axes(table.get("experts"), mesh)
  tensor_axes = tuple(a for a in _mesh_axes(table.get("mlp"), mesh) if a not in expert_axes)
  if num_experts % _size(mesh, expert_axes):
    logging.warning("MoE: %d experts do not divide mesh axes %s (%d); replicating the experts",
                    num_experts, expert_axes, _size(mesh, expert_axes))
    expert_axes = ()
  if mlp % _size(mesh, tensor_axes):
    logging.warning("MoE: expert hidden size %d does not divide mesh axes %s (%d); "
                    "replicating it", mlp, tensor_axes, _size(mesh, tensor_axes))
    tensor_axes = ()
  batch_axes = tuple(a for a in _mesh_axes(table.get("batch"), mesh)
                     if a not in tensor_axes + expert_axes)
  wanted = batch_axes + expert_axes
  token_axes = next(axes for axes in (wanted, batch_axes, ())
                    if num_tokens % _size(mesh, axes) == 0)
  if token_axes != wanted:
    logging.warning("MoE: %d tokens do not divide mesh axes %s (%d); sharding them over %s "
                    "only", num_tokens, wanted, _size(mesh, wanted), token_axes)
  return token_axes, expert_axes, tensor_axes


def expert_ffn_sharded(x_TD: jax.Array, weights_TK: jax.Array, expert_ids_TK: jax.Array,
                       gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                       mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES, *,
                       impl: str = "auto", tile: int | None = None,
                       tiles_per_step: int | None = None) -> jax.Array:
  """`expert_ffn` under `jax.shard_map` on `mesh` (axes from `expert_parallel_layout`).

  Each device holds T/|token axes| tokens and E/X experts. When the tokens are
  also split over the X expert shards, each device sorts its S = T_local*K slots
  by destination shard into a static [X, S] buffer (dropless: one shard may get
  all S), exchanges rows with `all_to_all`, runs its local experts grouped, and
  sends the outputs back the same way. When they are not, each device runs only
  its own experts' slots and the outputs are summed over the expert shards. A
  sharded expert hidden size adds a sum over those axes.
  """
  impl = resolve_impl(impl)
  (T, K), (E, _, F) = expert_ids_TK.shape, gate_EDF.shape
  token_axes, expert_axes, tensor_axes = expert_parallel_layout(mesh, rules, T, E, F)
  X = _size(mesh, expert_axes)
  all_to_all = bool(expert_axes) and set(expert_axes) <= set(token_axes)
  tok = P(token_axes or None, None)
  exp, mlp = expert_axes or None, tensor_axes or None

  def local(x_TD, weights_TK, ids_TK, gate_EDF, up_EDF, down_EFD):
    E_local = gate_EDF.shape[0]
    expert_S = _none_if_outside(ids_TK.reshape(-1), E)
    weights = (gate_EDF, up_EDF, down_EFD)
    # Rows each device computes, on average: its S slots (all_to_all) or 1/X of them.
    rows = expert_S.shape[0] // (1 if all_to_all else X)
    tiling = resolve_tiling(rows, E_local, tile, tiles_per_step)
    if all_to_all:
      y_SD = _exchange(x_TD, expert_S, weights, expert_axes, X, K, impl, tiling)
    else:
      if expert_axes:  # keep own experts' slots only
        first = jax.lax.axis_index(expert_axes) * E_local
        expert_S = _none_if_outside(expert_S - first, E_local)
      y_SD = _grouped_ffn(x_TD, expert_S, *weights, impl, tiling, slots_per_row=K)
    y_TD = _combine(y_SD, weights_TK, _F32)
    reduce_axes = tensor_axes + (() if all_to_all else expert_axes)
    if reduce_axes:
      y_TD = jax.lax.psum(y_TD, reduce_axes)
    return y_TD.astype(x_TD.dtype)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(tok, tok, tok, P(exp, None, mlp), P(exp, None, mlp), P(exp, mlp, None)),
      out_specs=tok)(x_TD, weights_TK, expert_ids_TK, gate_EDF, up_EDF, down_EFD)


def _exchange(x_TD, expert_S, weights, expert_axes, X, K, impl, tiling):
  """Slots [S] to their expert shards and back by all_to_all -> outputs [S, D]."""
  S, E_local = expert_S.shape[0], weights[0].shape[0]
  dest_S = jnp.where(expert_S < X * E_local, expert_S // E_local, X)
  _, rank_S = _sort_ranks(dest_S, X)
  send_pos_S = jnp.where(dest_S < X, dest_S * S + rank_S, X * S)  # [X, S] buffer, flat
  src_XS = jnp.full((X * S,), S, jnp.int32).at[send_pos_S].set(
      jnp.arange(S, dtype=jnp.int32), mode="drop")
  x_send = x_TD.at[src_XS // K].get(mode="fill", fill_value=0)
  local_send = (expert_S % E_local).at[src_XS].get(mode="fill", fill_value=E_local)
  exchange = functools.partial(jax.lax.all_to_all, axis_name=expert_axes, split_axis=0,
                               concat_axis=0, tiled=True)
  y_recv = _grouped_ffn(exchange(x_send), exchange(local_send), *weights, impl, tiling)
  return exchange(y_recv).at[send_pos_S].get(mode="fill", fill_value=0)


# -------------------------------------------------------------------------- the layer


def moe_layer(x: jax.Array, p: dict[str, jax.Array], cfg: MoEConfig, *,
              mesh: Mesh | None = None, rules: sharding.Rules | None = sharding.DEFAULT_RULES,
              mask: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
  """Router + routed experts on x [..., D] -> (y [..., D] in x's dtype, MoEAux).

  p: "router" [D, E], optional "expert_bias" [E], "gate_proj"/"up_proj" [E, D, F],
  "down_proj" [E, F, D]. With a mesh the experts run under shard_map
  (`expert_ffn_sharded`). mask (x's leading shape, 1 = real token) only
  weights the losses and token counts.
  """
  lead, D = x.shape[:-1], x.shape[-1]
  if p["router"].shape != (D, cfg.num_experts):
    raise ValueError(f"router weight has shape {p['router'].shape}, expected "
                     f"(d_model={D}, num_experts={cfg.num_experts})")
  x_TD = x.reshape(-1, D)
  constrain = functools.partial(sharding.constrain, rules=rules, mesh=mesh)
  logits_TE = constrain(router_logits(x_TD, p["router"]), ("batch", None))
  weights_TK, ids_TK = route(logits_TE, p.get("expert_bias"), cfg)
  experts = (p["gate_proj"], p["up_proj"], p["down_proj"])
  if mesh is None:
    y_TD = expert_ffn(x_TD, weights_TK, ids_TK, *experts, impl=cfg.impl, tile=cfg.tile,
                      tiles_per_step=cfg.tiles_per_step)
  else:
    y_TD = expert_ffn_sharded(x_TD, weights_TK, ids_TK, *experts, mesh,
                              rules or sharding.DEFAULT_RULES, impl=cfg.impl, tile=cfg.tile,
                              tiles_per_step=cfg.tiles_per_step)
  mask_T = None if mask is None else mask.reshape(-1)
  aux = MoEAux(
      load_balancing_loss(router_probs(logits_TE, cfg.router), ids_TK, mask_T),
      router_z_loss(logits_TE, mask_T),
      tokens_per_expert(ids_TK, cfg.num_experts, mask_T))
  return y_TD.reshape(*lead, D), aux
