"""The compiled sampler (SPEC §3): canvas set-up, a step, a block, all blocks.

A step is a model call on the cache policy's window (`kv_cache.py`) followed
by the pure reveal rule (`decoding.reveal`); a block runs its steps as a
`lax.fori_loop` (fixed counts) or a `lax.while_loop` (threshold / factor:
until the block has no masks, at most block_length steps). `sample_loop` runs
every block in one XLA program (`generate`); `sample_start` + `sample_block`
run one block per call (`generate_stream`). Both go through the same step and
block functions, so they compute the same tokens. Trace recording is compiled
in only when `Settings.trace` is set.

Randomness: step t of the fixed schedule (counted over all blocks) draws from
`fold_in(rng, t)`; under threshold / factor step i of block b uses
t = b · block_length + i (so threshold > 1 reproduces steps = gen_length).
The output head and the reveal run on the current block only; the noise of a
position is drawn from the step's key folded with the position's index in the
generated part, so each position gets the same noise under every cache policy
and whatever window computes it.
Temperature sampling is Gumbel-max in float32: argmax(logits / T + g) with
g = -log(-log u) is the same distribution as the reference's float64
argmax(exp(logits) / (-log u)^T); the log-space form cannot overflow, so
float32 suffices (JAX disables float64 by default and TPUs lack it).

NFE (`steps_run`) = the number of model calls actually run, full or
windowed; with CFG one call is the model on the doubled batch [cond; uncond].
It is the same for every row of a batch: a block runs until its last row is done.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llada_jax import sharding
from llada_jax.sampling import decoding
from llada_jax.sampling import kv_cache
from llada_jax.sampling.common import combine_guidance, guidance_batch
from llada_jax.sampling.settings import Settings


class Trace(NamedTuple):
  """What `generate(..., trace=True)` records, for visualisation.

  canvas_SBL: int32 [S, B, Lp + gen_length], the tokens after every step; S =
    steps (fixed counts) or gen_length (threshold / factor: the most steps a run
    can take); rows after the last step run repeat the final tokens.
  confidence_BL: float32 [B, Lp + gen_length], the model's probability of each
    generated token when it was revealed, softmax(logits)[token] at temperature 1
    (NaN for prompt positions and positions filled by stop_at_eos).
  step_BL: int32 [B, Lp + gen_length], the step that revealed it (-1 for the
    prompt and stop_at_eos filling).
  """
  canvas_SBL: jax.Array
  confidence_BL: jax.Array
  step_BL: jax.Array


class Consts(NamedTuple):
  """The traced inputs every step reads."""
  attn_BL: jax.Array | None  # {0,1} mask of the model's batch (doubled under CFG), or None
  fixed_BL: jax.Array  # bool: never masked (prompt, padding, constraints): CFG's prompt
  rng: jax.Array
  temperature: jax.Array
  cfg_scale: jax.Array
  accept_value: jax.Array  # the threshold or factor


class Carry(NamedTuple):
  """The state a step updates."""
  x_BL: jax.Array  # the canvas
  cache: Any  # KVCache (prefix / dual) or None
  trace: Any  # (canvas_SBL, confidence_BG, step_BG) or None
  steps_run: jax.Array  # int32: model calls so far (= NFE)


def _constrain(model, x_BL: jax.Array) -> jax.Array:
  return sharding.constrain(x_BL, ("batch", "length"), model.rules, model.mesh)


def _stop_ids(cfg) -> tuple[int, ...]:
  return (cfg.eos_token_id,) if cfg.eot_token_id is None else (cfg.eos_token_id,
                                                               cfg.eot_token_id)


def start(model, prompt_BP, attn_BP, constraint_G, rng, temperature, cfg_scale, accept_value,
          s: Settings) -> tuple[Carry, Consts]:
  """The canvas (prompt, then MASK or the constrained token), an empty cache and trace."""
  cfg = model.config
  B, _ = prompt_BP.shape
  G = s.gen_length
  gen_BG = jnp.full((B, G), cfg.mask_token_id, jnp.int32)
  if constraint_G is not None:
    gen_BG = jnp.where(constraint_G >= 0, constraint_G, gen_BG)
  x_BL = _constrain(model, jnp.concatenate([prompt_BP, gen_BG], axis=1))
  attn_BL = None
  if attn_BP is not None:
    attn_BL = jnp.concatenate([attn_BP, jnp.ones((B, G), attn_BP.dtype)], axis=1)
    if s.cfg:
      attn_BL = jnp.concatenate([attn_BL, attn_BL])
  cache = None
  if s.cache != "none":
    cache = kv_cache.empty_cache(cfg, B * (2 if s.cfg else 1), x_BL.shape[1])
  trace = None
  if s.trace:
    trace = (jnp.zeros((s.max_steps,) + x_BL.shape, jnp.int32), jnp.full((B, G), jnp.nan),
             jnp.full((B, G), -1, jnp.int32))
  consts = Consts(attn_BL, x_BL != cfg.mask_token_id, rng, temperature, cfg_scale,
                  accept_value)
  return Carry(x_BL, cache, trace, jnp.int32(0)), consts


def _record(trace, x_BL, revealed_BW, prob_BW, start_in_gen, row):
  """The trace after a step: its canvas in row `row`, and the confidence and
  step of the positions it revealed (window at `start_in_gen` of the generated part)."""
  canvas_SBL, conf_BG, step_BG = trace
  W = revealed_BW.shape[1]
  old_conf_BW = jax.lax.dynamic_slice_in_dim(conf_BG, start_in_gen, W, axis=1)
  old_step_BW = jax.lax.dynamic_slice_in_dim(step_BG, start_in_gen, W, axis=1)
  conf_BG = jax.lax.dynamic_update_slice_in_dim(
      conf_BG, jnp.where(revealed_BW, prob_BW, old_conf_BW), start_in_gen, axis=1)
  step_BG = jax.lax.dynamic_update_slice_in_dim(
      step_BG, jnp.where(revealed_BW, row, old_step_BW), start_in_gen, axis=1)
  return canvas_SBL.at[row].set(x_BL), conf_BG, step_BG


def step(model, c: Carry, k: Consts, b, i, t, masks_B, s: Settings, refresh=None,
         segments=None) -> Carry:
  """Step i of block b (t: its noise index): logits of the block, then `decoding.reveal`.
  segments: the model's `segments_for_loop()`, made before the step loop.

  refresh: whether a cached policy recomputes its cache (a Python bool: one
  program, no `lax.cond`); None: every `cache_refresh` steps of the block.
  """
  cfg = model.config
  G, bl = s.gen_length, s.block_length
  P = c.x_BL.shape[1] - G
  if refresh is None:
    refresh_every = s.cache_refresh or s.steps_per_block
    refresh = True if refresh_every == 1 else i % refresh_every == 0
  ids_BL = guidance_batch(model, c.x_BL, k.fixed_BL) if s.cfg else c.x_BL
  logits_BbV, cache = kv_cache.block_logits(
      model, ids_BL, k.attn_BL, c.cache, mode=s.cache, gen_length=G, block_length=bl,
      block=b, refresh=refresh, segments=segments)
  if s.cfg:
    logits_BbV = combine_guidance(logits_BbV, k.cfg_scale)
  if s.logits_eos_inf:
    logits_BbV = logits_BbV.at[..., cfg.eos_token_id].set(-jnp.inf)
  x_Bb = jax.lax.dynamic_slice_in_dim(c.x_BL, P + b * bl, bl, axis=1)
  x_Bb, revealed_Bb = decoding.reveal(
      x_Bb, logits_BbV, jax.random.fold_in(k.rng, t), step=i, masks_B=masks_B,
      temperature=k.temperature, value=k.accept_value, s=s, mask_id=cfg.mask_token_id,
      stop_ids=_stop_ids(cfg), offset=b * bl, max_k=_max_reveals(s))
  x_BL = _constrain(model, jax.lax.dynamic_update_slice_in_dim(c.x_BL, x_Bb, P + b * bl, axis=1))
  trace = c.trace
  if s.trace:
    trace = _record(trace, x_BL, revealed_Bb, decoding.token_prob(logits_BbV, x_Bb), b * bl,
                    c.steps_run)
  return Carry(x_BL, cache, trace, c.steps_run + 1)


def _max_reveals(s: Settings) -> int:
  """The most positions a step can reveal: ceil(block_length / steps) under the fixed
  schedule (a block holds at most block_length masks), the whole block otherwise."""
  if s.rule == "fixed":
    return -(-s.block_length // s.steps_per_block)
  return s.block_length


def _masks_in_block(model, x_BL, b, s: Settings) -> jax.Array:
  P = x_BL.shape[1] - s.gen_length
  block_BW = jax.lax.dynamic_slice_in_dim(x_BL, P + b * s.block_length, s.block_length, axis=1)
  return jnp.sum(block_BW == model.config.mask_token_id, axis=1, dtype=jnp.int32)


def block(model, c: Carry, k: Consts, b, s: Settings) -> tuple[Carry, jax.Array]:
  """Every step of block b -> (carry, whether every row has stopped: with
  stop_at_eos, all rows hold EOS / EoT in blocks ≤ b; the masks left are then EOS)."""
  spb, bl = s.steps_per_block, s.block_length
  segments = model.segments_for_loop()  # per-layer weights, once a block (CPU)
  if s.rule == "fixed":
    masks_B = _masks_in_block(model, c.x_BL, b, s)
    first = 0
    if s.cache != "none" and s.cache_refresh is None:  # step 0 refreshes, the others not
      c = step(model, c, k, b, 0, b * spb, masks_B, s, refresh=True, segments=segments)
      first = 1
    c = jax.lax.fori_loop(
        first, spb, lambda i, c: step(model, c, k, b, i, b * spb + i, masks_B, s,
                                      refresh=False if first else None, segments=segments), c)
  else:  # threshold / factor: until the block has no masks left (at most bl steps).
    def cond(ic):
      return (ic[0] < bl) & jnp.any(_masks_in_block(model, ic[1].x_BL, b, s) > 0)

    def body(ic):
      i, c = ic
      return i + 1, step(model, c, k, b, i, b * bl + i, None, s, segments=segments)

    c = jax.lax.while_loop(cond, body, (jnp.int32(0), c))[1]
  if not s.stop_at_eos:
    return c, jnp.bool_(False)
  cfg = model.config
  x_BL = c.x_BL
  P = x_BL.shape[1] - s.gen_length
  pos_L = jnp.arange(x_BL.shape[1], dtype=jnp.int32)
  done_L = (pos_L >= P) & (pos_L < P + (b + 1) * bl)
  stopped = jnp.all(jnp.any(jnp.isin(x_BL, jnp.asarray(_stop_ids(cfg))) & done_L, axis=1))
  x_BL = jnp.where(stopped & (x_BL == cfg.mask_token_id), cfg.eos_token_id, x_BL)
  return c._replace(x_BL=_constrain(model, x_BL)), stopped


def trace_of(c: Carry, s: Settings) -> Trace | None:
  """The `Trace` of the steps run so far (None unless s.trace)."""
  if not s.trace:
    return None
  canvas_SBL, conf_BG, step_BG = c.trace
  B, L = c.x_BL.shape
  P = L - s.gen_length
  ran_S11 = (jnp.arange(s.max_steps) < c.steps_run)[:, None, None]
  return Trace(jnp.where(ran_S11, canvas_SBL, c.x_BL[None]),
               jnp.concatenate([jnp.full((B, P), jnp.nan), conf_BG], axis=1),
               jnp.concatenate([jnp.full((B, P), -1, jnp.int32), step_BG], axis=1))


def sample_start(graphdef, state, prompt_BP, attn_BP, rng, temperature, cfg_scale,
                 accept_value, constraint_G, s: Settings) -> tuple[Carry, Consts]:
  return start(nnx.merge(graphdef, state), prompt_BP, attn_BP, constraint_G, rng, temperature,
               cfg_scale, accept_value, s)


def sample_block(graphdef, state, c: Carry, k: Consts, b, s: Settings):
  """Block b (traced) -> (carry, stopped, trace so far or None)."""
  c, stopped = block(nnx.merge(graphdef, state), c, k, b, s)
  return c, stopped, trace_of(c, s)


def sample_loop(graphdef, state, prompt_BP, attn_BP, rng, temperature, cfg_scale, accept_value,
                constraint_G, s: Settings):
  """The whole sampler -> (tokens [B, L], Trace or None, NFE int32)."""
  model = nnx.merge(graphdef, state)
  c, k = start(model, prompt_BP, attn_BP, constraint_G, rng, temperature, cfg_scale,
               accept_value, s)
  if s.stop_at_eos:
    def body(bcs):
      b, c, _ = bcs
      return (b + 1,) + block(model, c, k, b, s)

    cond = lambda bcs: (bcs[0] < s.num_blocks) & ~bcs[2]
    c = jax.lax.while_loop(cond, body, (jnp.int32(0), c, jnp.bool_(False)))[1]
  else:
    c = jax.lax.fori_loop(0, s.num_blocks, lambda b, c: block(model, c, k, b, s)[0], c)
  return c.x_BL, trace_of(c, s), c.steps_run
