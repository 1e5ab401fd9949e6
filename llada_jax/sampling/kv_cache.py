"""How a sampler step gets its logits under each KV-cache policy (Fast-dLLM style).

A step runs the layers on a *window* of positions, and the output head on the
current block's positions only (`block_logits`):

- "none": every step is a full forward; the window is the generated part.
- "prefix": a refresh step (the first of each block, and every `cache_refresh`
  steps) is a full forward that also stores every position's keys (after RoPE)
  and values; the other steps run the window = the block and everything after
  it, attending to the cached keys/values of the positions before the block.
- "dual": a refresh step is the same full forward; the other steps run only
  the block's positions, attending to the cache for every other position and
  writing the block's fresh keys/values into it in place.

Shapes are static, so a prefix window covers a static span [L − W, L) that may
start before the block: positions in it before the block (`fresh_from`) keep
their cached keys/values in every layer (`Transformer.forward_window`), which
computes exactly what the window [block start, L) would. `prefix_groups` picks
at most `MAX_PREFIX_WINDOWS` window sizes (one compiled window program each,
chosen per block by `lax.switch`).

On a mesh the cache [Y, B, S, K, H] is sharded like the activations
(`layers`, `batch`, `length`, `kv_heads`, `head_dim`: rows over the batch axes,
kv heads over `tensor`), pinned by constraints on every cache the loop carries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llada_jax.layers.attention import KVCache
from llada_jax.models.llada import DTYPES

CACHES = ("none", "prefix", "dual")
MAX_PREFIX_WINDOWS = 4


def prefix_groups(gen_length: int, block_length: int, max_windows: int = MAX_PREFIX_WINDOWS
                  ) -> list[tuple[int, int, int]]:
  """Consecutive block ranges sharing one prefix-window size:
  [(first block, end block, window W)], W = gen_length − first·block_length."""
  num_blocks = gen_length // block_length
  groups = min(num_blocks, max_windows)
  bounds = [round(g * num_blocks / groups) for g in range(groups + 1)]
  return [(b0, b1, gen_length - b0 * block_length) for b0, b1 in zip(bounds, bounds[1:])]


def empty_cache(cfg, batch: int, length: int) -> KVCache:
  """Zero keys/values [Y, batch, length, K, H] in the compute dtype."""
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, DTYPES[cfg.dtype])
  return KVCache(zeros, zeros)


def block_logits(model, ids_BL: jax.Array, attn_BL: jax.Array | None, cache: KVCache | None,
                 *, mode: str, gen_length: int, block_length: int, block, refresh,
                 segments=None) -> tuple[jax.Array, KVCache | None]:
  """float32 logits [B, block_length, V] of the current `block` (traced), and the cache.

  Every policy runs the layers on its window, then the output head on the
  block's positions only; a full forward runs its last layer's queries,
  attention and FFN on the block's positions only (`rows`: no other output is
  used). mode "none": a full forward. "prefix" / "dual": a full forward storing
  the cache when `refresh` (a traced or Python bool), else the window against
  `cache`. `segments`: the model's `segments_for_loop()`, made outside the step loop.
  """
  if cache is not None:
    with model.activation_mesh():  # the loop carries it sharded like the activations
      cache = cache.constrained()
  L = ids_BL.shape[1]
  start = L - gen_length + block * block_length  # the block's first position

  def head(x_BWD, window_start):
    x_BbD = jax.lax.dynamic_slice_in_dim(x_BWD, start - window_start, block_length, axis=1)
    return model.head_logits(x_BbD)

  rows = (start, block_length)  # the last layer runs on the block only
  if mode == "none":
    return (model.head_logits(model.forward_hidden(ids_BL, attn_BL, rows=rows,
                                                   segments=segments)), cache)

  def full(_):
    x_BbD, new_cache = model.forward_with_cache(ids_BL, attn_BL, head=False, rows=rows,
                                                segments=segments)
    return model.head_logits(x_BbD), new_cache

  def dual_window(old_cache):
    ids_BW = jax.lax.dynamic_slice_in_dim(ids_BL, start, block_length, axis=1)
    x_BWD, new_cache = model.forward_window(ids_BW, start, old_cache, attn_BL, head=False,
                                            segments=segments)
    return model.head_logits(x_BWD), new_cache

  def prefix_window(width: int, old_cache):
    x_BWD, _ = model.forward_window(ids_BL[:, L - width:], L - width, old_cache, attn_BL,
                                    fresh_from=start, head=False, segments=segments)
    # The window recomputes all its positions every step: keep the refresh cache.
    return head(x_BWD, L - width), old_cache

  if mode == "dual":
    window = dual_window
  else:
    groups = prefix_groups(gen_length, block_length)
    group_of_block = jnp.asarray(sum(([g] * (b1 - b0) for g, (b0, b1, _) in enumerate(groups)),
                                     []), jnp.int32)
    branches = [functools.partial(prefix_window, width) for _, _, width in groups]
    window = lambda c: jax.lax.switch(group_of_block[block], branches, c)
  if isinstance(refresh, bool):  # known when tracing: one program, no lax.cond
    return full(cache) if refresh else window(cache)
  return jax.lax.cond(refresh, full, window, cache)
