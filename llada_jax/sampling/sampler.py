"""`generate`: LLaDA's masked-diffusion sampler (SPEC §3) and its fast variants, as one XLA program.

The whole loop — every block, every step — is a single jitted function,
compiled once per (model, batch, prompt length, settings) and cached by
`jax.jit`; nothing returns to the host between steps. Fixed step counts run as
`lax.fori_loop`s; the data-dependent threshold / factor rules (`decoding.py`)
and `stop_at_eos` as `lax.while_loop`s with static shapes. The per-row top-k of
a data-dependent count k_row is vectorised (`decoding.topk_mask`), so rows
with different mask counts share one program. KV caching (`kv_cache.py`):
"prefix" and "dual" store keys/values at the first step of each block (and
every `cache_refresh` steps) and run the other steps on a window only.

NFE (`return_nfe=True`) = the number of model calls actually run, full or
windowed; with CFG one call is the model on the doubled batch [cond; uncond]
(so the model runs on 2B rows NFE times). It is the same for every row of a
batch: the loop runs until the last row is done.

Randomness: step t of the fixed schedule (counted over all blocks) draws from
`fold_in(rng, t)`; under threshold / factor step i of block b uses
t = b · block_length + i (so threshold > 1 reproduces steps = gen_length).
Logits always span the whole generated part (zeros outside the step's window),
so each position gets the same noise under every cache policy.
Temperature sampling is Gumbel-max in float32: argmax(logits / T + g) with
g = -log(-log u) is the same distribution as the reference's float64
argmax(exp(logits) / (-log u)^T); the log-space form cannot overflow, so
float32 suffices (JAX disables float64 by default and TPUs lack it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from llada_jax import sharding
from llada_jax.sampling import decoding
from llada_jax.sampling import kv_cache
from llada_jax.sampling.decoding import step_counts, topk_mask  # pylint: disable=unused-import

REMASKING = ("low_confidence", "random")


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


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static (compile-time) part of a `generate` call."""
  steps: int
  gen_length: int
  block_length: int
  sample: bool  # temperature > 0 (the value itself is a traced scalar)
  cfg: bool  # cfg_scale > 0 (likewise)
  remasking: str
  logits_eos_inf: bool
  confidence_eos_eot_inf: bool
  trace: bool
  cache: str = "none"  # kv_cache.CACHES
  cache_refresh: int | None = None  # refresh every N steps of a block (None: once per block)
  rule: str = "fixed"  # decoding.RULES (the threshold / factor value is traced)
  stop_at_eos: bool = False

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    """Steps per block; the most a block can take under threshold / factor."""
    return self.steps // self.num_blocks if self.rule == "fixed" else self.block_length

  @property
  def max_steps(self) -> int:
    return self.num_blocks * self.steps_per_block


def guided_logits(model, x_BL: jax.Array, attn_BL: jax.Array | None, prompt_BL: jax.Array,
                  cfg_scale: jax.Array) -> jax.Array:
  """Unsupervised classifier-free guidance: un + (cfg_scale + 1) (cond - un), where
  `un` is the logits of x with every `prompt_BL` position set to MASK (one doubled batch)."""
  both_attn = None if attn_BL is None else jnp.concatenate([attn_BL, attn_BL])
  both_BLV = model.forward(guidance_batch(model, x_BL, prompt_BL), both_attn)
  return combine_guidance(both_BLV, cfg_scale)


def guidance_batch(model, x_BL: jax.Array, prompt_BL: jax.Array) -> jax.Array:
  """[2B, L]: x, then x with every `prompt_BL` position set to MASK."""
  return jnp.concatenate([x_BL, jnp.where(prompt_BL, model.config.mask_token_id, x_BL)])


def combine_guidance(both_BLV: jax.Array, cfg_scale: jax.Array) -> jax.Array:
  """Logits [2B, ...] of `guidance_batch` -> un + (cfg_scale + 1) (cond - un)."""
  B = both_BLV.shape[0] // 2
  cond_BLV, un_BLV = both_BLV[:B], both_BLV[B:]
  return un_BLV + (cfg_scale + 1.0) * (cond_BLV - un_BLV)


def _prob_of(logits_BGV: jax.Array, x0_BG: jax.Array) -> jax.Array:
  """softmax(logits)[x0], computed as the reference's softmax does (max-shifted)."""
  shifted_BGV = logits_BGV - jnp.max(logits_BGV, axis=-1, keepdims=True)
  picked_BG = jnp.take_along_axis(shifted_BGV, x0_BG[..., None], axis=-1)[..., 0]
  return jnp.exp(picked_BG) / jnp.sum(jnp.exp(shifted_BGV), axis=-1)


class _Carry(NamedTuple):
  x_BL: jax.Array  # the canvas
  cache: Any  # KVCache (prefix / dual) or None
  trace: Any  # (canvas_SBL, confidence_BL, step_BL) or None
  steps_run: jax.Array  # int32: model calls so far (= NFE)


def _sample_loop(graphdef, state, prompt_BP, attn_BP, rng, temperature, cfg_scale,
                 accept_value, constraint_G, s: Settings):
  """The whole sampler; returns (tokens [B, L], Trace or None, NFE int32)."""
  model = nnx.merge(graphdef, state)
  cfg = model.config
  mask_id, eos_id, eot_id = cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id
  stop_ids = jnp.asarray([eos_id] if eot_id is None else [eos_id, eot_id])
  B, P = prompt_BP.shape
  G, bl, spb = s.gen_length, s.block_length, s.steps_per_block
  L = P + G
  constrain = lambda x: sharding.constrain(x, ("batch", "length"), model.rules, model.mesh)

  if constraint_G is None:
    constraint_G = jnp.full((G,), -1, jnp.int32)
  gen_BG = jnp.where(constraint_G >= 0, constraint_G, jnp.full((B, G), mask_id, jnp.int32))
  x_BL = constrain(jnp.concatenate([prompt_BP, gen_BG], axis=1))
  attn_BL = None if attn_BP is None else jnp.concatenate(
      [attn_BP, jnp.ones((B, G), attn_BP.dtype)], axis=1)
  fixed_BL = x_BL != mask_id  # the reference's prompt_index (pads and constraints too)
  pos_L = jnp.arange(L, dtype=jnp.int32)
  gpos_G = jnp.arange(G, dtype=jnp.int32)
  if s.cfg:
    attn_BL = None if attn_BL is None else jnp.concatenate([attn_BL, attn_BL])
  model_ids = (lambda x: guidance_batch(model, x, fixed_BL)) if s.cfg else (lambda x: x)
  refresh_every = s.cache_refresh or spb

  def step(b, i, t, n_B, c: _Carry) -> _Carry:
    """Step i of block b (t: its noise index); logits are computed for the
    cache policy's window only, the rest of the generated part is zeros."""
    logits_BGV, cache = kv_cache.gen_logits(
        model, model_ids(c.x_BL), attn_BL, c.cache, mode=s.cache, gen_length=G,
        block_length=bl, block=b, refresh=True if refresh_every == 1 else i % refresh_every == 0)
    if s.cfg:
      logits_BGV = combine_guidance(logits_BGV, cfg_scale)
    if s.logits_eos_inf:
      logits_BGV = logits_BGV.at[..., eos_id].set(-jnp.inf)
    key_gumbel, key_remask = jax.random.split(jax.random.fold_in(rng, t))
    if s.sample:
      g_BGV = jax.random.gumbel(key_gumbel, logits_BGV.shape, jnp.float32)
      x0_BG = jnp.argmax(logits_BGV / temperature + g_BGV, axis=-1).astype(jnp.int32)
    else:
      x0_BG = jnp.argmax(logits_BGV, axis=-1).astype(jnp.int32)
    if s.remasking == "low_confidence":
      conf_logits_BGV = logits_BGV
      if s.confidence_eos_eot_inf:  # the reference meant this for both ids (SPEC §3)
        conf_logits_BGV = logits_BGV.at[..., stop_ids].set(-jnp.inf)
      conf_BG = _prob_of(conf_logits_BGV, x0_BG)
    else:
      conf_BG = jax.random.uniform(key_remask, (B, G), jnp.float32)
    if s.confidence_eos_eot_inf:
      conf_BG = jnp.where(jnp.isin(x0_BG, stop_ids), -jnp.inf, conf_BG)
    x_BG = c.x_BL[:, P:]
    candidate_BG = (x_BG == mask_id) & (gpos_G < (b + 1) * bl)
    if s.rule == "fixed":
      k_B = decoding.step_counts(n_B, spb, i)
    else:
      k_B = decoding.adaptive_counts(s.rule, conf_BG, candidate_BG, accept_value)
    reveal_BG = decoding.topk_mask(conf_BG, k_B, candidate_BG)
    x_BG = jnp.where(reveal_BG, x0_BG, x_BG)
    x_BG = jnp.where(constraint_G >= 0, constraint_G, x_BG)  # as the reference app
    x_BL = constrain(jnp.concatenate([c.x_BL[:, :P], x_BG], axis=1))
    tr = c.trace
    if s.trace:
      prob_BG = _prob_of(logits_BGV, x0_BG)  # XLA shares it with conf_BG when equal
      canvas_SBL, conf_BG_tr, step_BG = tr
      tr = (canvas_SBL.at[c.steps_run].set(x_BL), jnp.where(reveal_BG, prob_BG, conf_BG_tr),
            jnp.where(reveal_BG, c.steps_run, step_BG))
    return _Carry(x_BL, cache, tr, c.steps_run + 1)

  def masks_in_block(x_BL, b):
    in_block_L = (pos_L >= P + b * bl) & (pos_L < P + (b + 1) * bl)
    return jnp.sum((x_BL == mask_id) & in_block_L, axis=1, dtype=jnp.int32)

  def block(b, c: _Carry) -> _Carry:
    if s.rule == "fixed":
      n_B = masks_in_block(c.x_BL, b)
      return jax.lax.fori_loop(0, spb, lambda i, c: step(b, i, b * spb + i, n_B, c), c)
    # threshold / factor: until the block has no masks left (at most bl steps).
    def cond(ic):
      return (ic[0] < bl) & jnp.any(masks_in_block(ic[1].x_BL, b) > 0)
    def body(ic):
      i, c = ic
      return i + 1, step(b, i, b * bl + i, None, c)
    return jax.lax.while_loop(cond, body, (jnp.int32(0), c))[1]

  def all_rows_stopped(x_BL, b):
    """Every row holds EOS / EoT in the generated part of blocks < b."""
    done_L = (pos_L >= P) & (pos_L < P + b * bl)
    return jnp.all(jnp.any(jnp.isin(x_BL, stop_ids) & done_L, axis=1))

  tr = None
  if s.trace:
    tr = (jnp.zeros((s.max_steps,) + x_BL.shape, jnp.int32), jnp.full((B, G), jnp.nan),
          jnp.full((B, G), -1, jnp.int32))
  cache = None
  if s.cache != "none":
    cache = kv_cache.empty_cache(cfg, B * (2 if s.cfg else 1), L)
  c = _Carry(x_BL, cache, tr, jnp.int32(0))
  if s.stop_at_eos:
    cond = lambda bc: (bc[0] < s.num_blocks) & ~all_rows_stopped(bc[1].x_BL, bc[0])
    c = jax.lax.while_loop(cond, lambda bc: (bc[0] + 1, block(*bc)), (jnp.int32(0), c))[1]
  else:
    c = jax.lax.fori_loop(0, s.num_blocks, block, c)
  x_BL = c.x_BL
  if s.stop_at_eos:  # blocks skipped once every row stopped
    x_BL = constrain(jnp.where(x_BL == mask_id, eos_id, x_BL))
  if not s.trace:
    return x_BL, None, c.steps_run
  canvas_SBL, conf_BG, step_BG = c.trace
  ran_S11 = (jnp.arange(s.max_steps) < c.steps_run)[:, None, None]
  return x_BL, Trace(jnp.where(ran_S11, canvas_SBL, x_BL[None]),
                     jnp.concatenate([jnp.full((B, P), jnp.nan), conf_BG], axis=1),
                     jnp.concatenate([jnp.full((B, P), -1, jnp.int32), step_BG], axis=1)
                     ), c.steps_run


# graphdef is a static pytree node; Settings is hashable: one compile per shapes+settings.
_sample_loop_jit = jax.jit(_sample_loop, static_argnames=("s",))


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")
  return int(value)


def check_ids(name: str, ids: np.ndarray, embedding_size: int) -> None:
  """ValueError naming `name` if any id lies outside [0, embedding_size)."""
  if ids.size and (ids.min() < 0 or ids.max() >= embedding_size):
    bad = ids[(ids < 0) | (ids >= embedding_size)].ravel()[0]
    raise ValueError(f"{name}: token id {bad} is outside [0, embedding_size={embedding_size})")


def _as_batch(model, prompt_ids, attention_mask):
  prompt = np.asarray(prompt_ids)
  if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0 or not np.issubdtype(
      prompt.dtype, np.integer):
    raise ValueError(f"prompt_ids: expected non-empty integer ids [B, Lp] or [Lp], "
                     f"got {prompt.dtype} {prompt.shape}")
  check_ids("prompt_ids", prompt, model.config.embedding_size)
  prompt = np.atleast_2d(prompt).astype(np.int32)
  mask = None
  if attention_mask is not None:
    mask = np.atleast_2d(np.asarray(attention_mask))
    if mask.shape != prompt.shape:
      raise ValueError(f"attention_mask: shape {mask.shape} differs from prompt_ids "
                       f"{prompt.shape}")
    if not np.isin(mask, (0, 1)).all():
      raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")
    if not mask.any(axis=1).all():
      raise ValueError("attention_mask: a row has no tokens (all zeros)")
    mask = mask.astype(np.int32)
  return prompt, mask


def _constraint_array(constraints, gen_length, embedding_size):
  if not constraints:
    return None
  out = np.full((gen_length,), -1, np.int32)
  for pos, tok in dict(constraints).items():
    if not 0 <= int(pos) < gen_length:
      raise ValueError(f"constraints: position {pos} is outside the generated part "
                       f"[0, gen_length={gen_length})")
    if not 0 <= int(tok) < embedding_size:
      raise ValueError(f"constraints: token {tok} at position {pos} is outside "
                       f"[0, embedding_size={embedding_size})")
    out[int(pos)] = int(tok)
  return out


def check_settings(cfg, prompt_len: int, *, steps, gen_length, block_length, temperature,
                   cfg_scale, remasking, logits_eos_inf, confidence_eos_eot_inf,
                   cache="none", cache_refresh=None, threshold=None, factor=None,
                   stop_at_eos=False, return_nfe=False, trace=False) -> Settings:
  """Validates sampler settings (ValueError naming the argument) -> `Settings`.

  With cfg=None (no model yet) the length limit is not checked.
  """
  steps = positive_int("steps", steps)
  gen_length = positive_int("gen_length", gen_length)
  block_length = positive_int("block_length", block_length)
  if gen_length % block_length:
    raise ValueError(f"block_length: gen_length={gen_length} is not a multiple of "
                     f"block_length={block_length}")
  num_blocks = gen_length // block_length
  rule = _accept_rule(threshold, factor, remasking)
  if steps % num_blocks and rule == "fixed":
    raise ValueError(f"steps: {steps} is not a multiple of the number of blocks "
                     f"(gen_length / block_length = {num_blocks})")
  if steps > gen_length and rule == "fixed":
    raise ValueError(f"steps: {steps} exceeds gen_length={gen_length} (a step would "
                     f"reveal nothing)")
  if cache not in kv_cache.CACHES:
    raise ValueError(f"cache: {cache!r} is not one of {kv_cache.CACHES}")
  if cache_refresh is not None:
    cache_refresh = positive_int("cache_refresh", cache_refresh)
  for name, value in (("stop_at_eos", stop_at_eos), ("return_nfe", return_nfe),
                      ("logits_eos_inf", logits_eos_inf),
                      ("confidence_eos_eot_inf", confidence_eos_eot_inf)):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name}: expected True or False, got {value!r}")
  if cfg is not None and prompt_len + gen_length > cfg.max_sequence_length:
    raise ValueError(f"gen_length: prompt length {prompt_len} + gen_length {gen_length} "
                     f"exceeds max_sequence_length={cfg.max_sequence_length}")
  for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
    if (isinstance(value, (bool, str)) or np.ndim(value) != 0
        or not np.issubdtype(np.asarray(value).dtype, np.number)
        or not np.isfinite(value) or value < 0):
      raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
  if remasking not in REMASKING:
    raise ValueError(f"remasking: {remasking!r} is not one of {REMASKING}")
  return Settings(steps=steps, gen_length=gen_length, block_length=block_length,
                  sample=float(temperature) > 0, cfg=float(cfg_scale) > 0,
                  remasking=remasking, logits_eos_inf=bool(logits_eos_inf),
                  confidence_eos_eot_inf=bool(confidence_eos_eot_inf), trace=bool(trace),
                  cache=cache, cache_refresh=None if cache == "none" else cache_refresh,
                  rule=rule, stop_at_eos=bool(stop_at_eos))


def _accept_rule(threshold, factor, remasking) -> str:
  """"fixed", "threshold" or "factor", after checking the values."""
  if threshold is not None and factor is not None:
    raise ValueError("threshold, factor: give at most one of them")
  for name, value in (("threshold", threshold), ("factor", factor)):
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
        np.isfinite(value) and value > 0):
      raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    if remasking != "low_confidence":
      raise ValueError(f"{name}: needs remasking='low_confidence' (it compares model "
                       f"confidences), got remasking={remasking!r}")
    return name
  return "fixed"


def place_batch(model, x: np.ndarray | None) -> jax.Array | None:
  """Puts a host [B, ...] array on device; split over the data axes if the model has a mesh."""
  if x is None:
    return None
  if getattr(model, "mesh", None) is None:
    return jnp.asarray(x)
  names = ("batch",) + (None,) * (x.ndim - 1)
  spec = sharding.logical_to_spec(names, model.rules, model.mesh, x.shape, warn=False)
  return jax.device_put(x, NamedSharding(model.mesh, spec))


def as_key(rng) -> jax.Array:
  """A PRNG key from a key, an int seed or None (a fixed default key)."""
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


def generate(model, prompt_ids, attention_mask=None, *, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.,
             cfg_scale: float = 0., remasking: str = "low_confidence",
             logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             cache: str = "none", cache_refresh: int | None = None,
             threshold: float | None = None, factor: float | None = None,
             stop_at_eos: bool = False, return_nfe: bool = False,
             rng: Any = None, trace: bool = False,
             constraints: Mapping[int, int] | None = None, **block_options):
  """Samples `gen_length` tokens after each prompt (SPEC §3), optionally faster.

  Block-diffusion models (family llada2) run `sampling/block.py` instead, with
  the same arguments where the meaning is the same (`steps` per block,
  `threshold` its commit rule) plus `block_options` (editing_threshold,
  max_post_steps, num_to_transfer, kv_cache); dense-only settings are refused.

  Args:
    model: a `Transformer` (its config gives the mask, EOS and EoT ids; one
      loaded onto a mesh runs sharded, the batch split over the data axes).
    prompt_ids: int [B, Lp] (left-padded with EOS when lengths differ) or [Lp].
    attention_mask: {0,1} [B, Lp] (0 = padding) or None (no masking).
    steps, gen_length, block_length: denoising steps in all; tokens to generate;
      semi-autoregressive block size (= gen_length for pure diffusion).
    temperature: 0 = argmax; > 0 = Gumbel-max sampling from softmax(logits / T).
    cfg_scale: unsupervised classifier-free guidance (0 = off).
    remasking: "low_confidence" (reveal the most probable first) or "random".
    logits_eos_inf: never generate EOS.
    confidence_eos_eot_inf: reveal EOS / EoT only after every other token of a block.
    cache: "none" (a full forward every step, the reference), "prefix" or "dual"
      (keys/values cached at the first step of each block; the other steps run
      the block and all after it, or the block only; see `kv_cache.py`).
    cache_refresh: with a cache, also recompute it every N steps of a block
      (None: at each block's first step only). N = 1 is exact (full passes).
    threshold: reveal, per step, the most confident masked position of the block
      plus every one with confidence >= threshold; a block runs until it has no
      masks (`steps` is ignored). Needs remasking="low_confidence".
    factor: reveal the top-ranked candidate, and rank n >= 2 while
      c_(n) >= 1 - factor / (n + 1) (`decoding.py`); `steps` is ignored.
    stop_at_eos: once every row holds EOS / EoT in a finished block, fill the
      remaining blocks with EOS without running the model.
    return_nfe: also return the number of model calls run (module docstring).
    rng: a jax PRNG key or int seed (None = key 0); step t uses fold_in(rng, t).
    trace: also return a `Trace` (canvas after every step, reveal confidences).
    constraints: {position in the generated part: token id}, fixed from the start.
  Returns:
    int32 [B, Lp + gen_length] ([Lp + gen_length] for a 1-D prompt), the prompt
    included; with trace=True, (tokens, trace); with return_nfe=True, the NFE
    (int) last: (tokens, nfe) or (tokens, trace, nfe).
  """
  if model.config.family == "llada2":  # block diffusion
    from llada_jax.sampling import block  # pylint: disable=g-import-not-at-top
    return block.generate(
        model, prompt_ids, attention_mask, steps=steps, gen_length=gen_length,
        block_length=block_length, temperature=temperature, threshold=threshold,
        stop_at_eos=stop_at_eos, return_nfe=return_nfe, rng=rng, cfg_scale=cfg_scale,
        remasking=remasking, logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf, cache=cache,
        cache_refresh=cache_refresh, factor=factor, trace=trace, constraints=constraints,
        **block_options)
  if block_options:
    raise ValueError(f"{', '.join(block_options)}: settings of block-diffusion models "
                     f"(llada2); {model.config.family} models do not take them")
  cfg = model.config
  squeeze = np.ndim(prompt_ids) == 1
  prompt_BP, attn_BP = _as_batch(model, prompt_ids, attention_mask)
  settings = check_settings(
      cfg, prompt_BP.shape[1], steps=steps, gen_length=gen_length, block_length=block_length,
      temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
      cache=cache, cache_refresh=cache_refresh, threshold=threshold, factor=factor,
      stop_at_eos=stop_at_eos, return_nfe=return_nfe, trace=trace)
  accept_value = threshold if factor is None else factor
  constraint_G = _constraint_array(constraints, settings.gen_length, cfg.embedding_size)
  graphdef, state = nnx.split(model)
  tokens, tr, nfe = _sample_loop_jit(
      graphdef, state, place_batch(model, prompt_BP), place_batch(model, attn_BP),
      as_key(rng), jnp.float32(temperature), jnp.float32(cfg_scale),
      jnp.float32(accept_value or 0.), None if constraint_G is None else jnp.asarray(constraint_G),
      s=settings)
  if squeeze:
    tokens = tokens[0]
    if trace:
      tr = Trace(tr.canvas_SBL[:, 0], tr.confidence_BL[0], tr.step_BL[0])
  out = (tokens,) + ((tr,) if trace else ()) + ((int(nfe),) if return_nfe else ())
  return out[0] if len(out) == 1 else out
