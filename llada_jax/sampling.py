"""`generate`: LLaDA's fixed-step masked-diffusion sampler (SPEC §3) as one XLA program.

The whole loop — every block, every step — is a single jitted function built
on `lax.fori_loop`, compiled once per (model, batch, prompt length, settings)
and cached by `jax.jit`; nothing returns to the host between steps. The
per-row top-k of a data-dependent count k_row is vectorised: positions are
ranked by confidence with one sort (`topk_mask`) and those with rank < k_row
are revealed, so rows with different mask counts share one program.

Randomness: step t (counted over all blocks) draws from `fold_in(rng, t)`.
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

REMASKING = ("low_confidence", "random")


class Trace(NamedTuple):
  """What `generate(..., trace=True)` records, for visualisation.

  canvas_SBL: int32 [steps, B, Lp + gen_length], the tokens after every step.
  confidence_BL: float32 [B, Lp + gen_length], the model's probability of each
    generated token when it was revealed, softmax(logits)[token] at temperature 1
    (NaN for prompt positions).
  step_BL: int32 [B, Lp + gen_length], the step that revealed it (-1 for the prompt).
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

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks


def topk_mask(score_BL: jax.Array, k_B: jax.Array, valid_BL: jax.Array) -> jax.Array:
  """bool [B, L]: per row, the k_B[row] valid positions with the highest score.

  One sort per row orders valid positions first, then by descending score, then
  by position; a position is taken when its rank < k_row. Valid positions with
  score -inf still rank above invalid ones.
  """
  B, L = score_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  invalid_BL = (~valid_BL).astype(jnp.int32)
  _, _, order_BL = jax.lax.sort((invalid_BL, -score_BL, pos_BL), dimension=1, num_keys=2)
  rank_BL = jnp.argsort(order_BL, axis=1)
  return valid_BL & (rank_BL < k_B[:, None])


def step_counts(n_B: jax.Array, steps: int, step: jax.Array) -> jax.Array:
  """Tokens to reveal at `step` of a block holding n_B masks: n // steps, and one
  more in the first n % steps steps (the reference's get_num_transfer_tokens)."""
  return n_B // steps + (step < n_B % steps).astype(n_B.dtype)


def guided_logits(model, x_BL: jax.Array, attn_BL: jax.Array | None, prompt_BL: jax.Array,
                  cfg_scale: jax.Array) -> jax.Array:
  """Unsupervised classifier-free guidance: un + (cfg_scale + 1) (cond - un), where
  `un` is the logits of x with every `prompt_BL` position set to MASK (one doubled batch)."""
  B = x_BL.shape[0]
  un_BL = jnp.where(prompt_BL, model.config.mask_token_id, x_BL)
  both_attn = None if attn_BL is None else jnp.concatenate([attn_BL, attn_BL])
  both_BLV = model.forward(jnp.concatenate([x_BL, un_BL]), both_attn)
  cond_BLV, un_BLV = both_BLV[:B], both_BLV[B:]
  return un_BLV + (cfg_scale + 1.0) * (cond_BLV - un_BLV)


def _prob_of(logits_BGV: jax.Array, x0_BG: jax.Array) -> jax.Array:
  """softmax(logits)[x0], computed as the reference's softmax does (max-shifted)."""
  shifted_BGV = logits_BGV - jnp.max(logits_BGV, axis=-1, keepdims=True)
  picked_BG = jnp.take_along_axis(shifted_BGV, x0_BG[..., None], axis=-1)[..., 0]
  return jnp.exp(picked_BG) / jnp.sum(jnp.exp(shifted_BGV), axis=-1)


def _sample_loop(graphdef, state, prompt_BP, attn_BP, rng, temperature, cfg_scale,
                 constraint_G, s: Settings):
  model = nnx.merge(graphdef, state)
  cfg = model.config
  mask_id, eos_id, eot_id = cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id
  stop_ids = [eos_id] if eot_id is None else [eos_id, eot_id]
  B, P = prompt_BP.shape
  G, S = s.gen_length, s.steps
  constrain = lambda x: sharding.constrain(x, ("batch", "length"), model.rules, model.mesh)

  gen_BG = jnp.full((B, G), mask_id, jnp.int32)
  if constraint_G is not None:
    gen_BG = jnp.where(constraint_G >= 0, constraint_G, gen_BG)
  x_BL = constrain(jnp.concatenate([prompt_BP, gen_BG], axis=1))
  attn_BL = None if attn_BP is None else jnp.concatenate(
      [attn_BP, jnp.ones((B, G), attn_BP.dtype)], axis=1)
  fixed_BL = x_BL != mask_id  # the reference's prompt_index (pads and constraints too)
  gpos_G = jnp.arange(G, dtype=jnp.int32)

  def logits_of(x_BL):
    if not s.cfg:
      return model.forward(x_BL, attn_BL)[:, P:]
    return guided_logits(model, x_BL, attn_BL, fixed_BL, cfg_scale)[:, P:]

  def one_step(t, block_end, k_B, carry):
    x_BL, tr = carry
    x_BG = x_BL[:, P:]
    logits_BGV = logits_of(x_BL)
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
        conf_logits_BGV = logits_BGV.at[..., jnp.asarray(stop_ids)].set(-jnp.inf)
      conf_BG = _prob_of(conf_logits_BGV, x0_BG)
    else:
      conf_BG = jax.random.uniform(key_remask, (B, G), jnp.float32)
    if s.confidence_eos_eot_inf:
      conf_BG = jnp.where(jnp.isin(x0_BG, jnp.asarray(stop_ids)), -jnp.inf, conf_BG)
    candidate_BG = (x_BG == mask_id) & (gpos_G < block_end)
    reveal_BG = topk_mask(conf_BG, k_B, candidate_BG)
    x_BG = jnp.where(reveal_BG, x0_BG, x_BG)
    if constraint_G is not None:  # re-imposed every step, as the reference app does
      x_BG = jnp.where(constraint_G >= 0, constraint_G, x_BG)
    x_BL = constrain(jnp.concatenate([x_BL[:, :P], x_BG], axis=1))
    if s.trace:
      prob_BG = _prob_of(logits_BGV, x0_BG)  # XLA shares it with conf_BG when equal
      canvas_SBL, conf_BG_tr, step_BG = tr
      tr = (canvas_SBL.at[t].set(x_BL), jnp.where(reveal_BG, prob_BG, conf_BG_tr),
            jnp.where(reveal_BG, t, step_BG))
    return x_BL, tr

  spb = s.steps_per_block

  def one_block(b, carry):
    block_end = (b + 1) * s.block_length
    in_block_G = (gpos_G >= b * s.block_length) & (gpos_G < block_end)
    n_B = jnp.sum((carry[0][:, P:] == mask_id) & in_block_G, axis=1, dtype=jnp.int32)
    return jax.lax.fori_loop(
        0, spb, lambda i, c: one_step(b * spb + i, block_end, step_counts(n_B, spb, i), c),
        carry)

  tr = None
  if s.trace:
    tr = (jnp.zeros((S,) + x_BL.shape, jnp.int32), jnp.full((B, G), jnp.nan, jnp.float32),
          jnp.full((B, G), -1, jnp.int32))
  x_BL, tr = jax.lax.fori_loop(0, s.num_blocks, one_block, (x_BL, tr))
  if not s.trace:
    return x_BL
  canvas_SBL, conf_BG, step_BG = tr
  return x_BL, Trace(canvas_SBL,
                     jnp.concatenate([jnp.full((B, P), jnp.nan), conf_BG], axis=1),
                     jnp.concatenate([jnp.full((B, P), -1, jnp.int32), step_BG], axis=1))


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
                   trace=False) -> Settings:
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
  if steps % num_blocks:
    raise ValueError(f"steps: {steps} is not a multiple of the number of blocks "
                     f"(gen_length / block_length = {num_blocks})")
  if steps > gen_length:
    raise ValueError(f"steps: {steps} exceeds gen_length={gen_length} (a step would "
                     f"reveal nothing)")
  if cfg is not None and prompt_len + gen_length > cfg.max_sequence_length:
    raise ValueError(f"gen_length: prompt length {prompt_len} + gen_length {gen_length} "
                     f"exceeds max_sequence_length={cfg.max_sequence_length}")
  for name, value in (("temperature", temperature), ("cfg_scale", cfg_scale)):
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
  if remasking not in REMASKING:
    raise ValueError(f"remasking: {remasking!r} is not one of {REMASKING}")
  return Settings(steps=steps, gen_length=gen_length, block_length=block_length,
                  sample=float(temperature) > 0, cfg=float(cfg_scale) > 0,
                  remasking=remasking, logits_eos_inf=bool(logits_eos_inf),
                  confidence_eos_eot_inf=bool(confidence_eos_eot_inf), trace=bool(trace))


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
             rng: Any = None, trace: bool = False,
             constraints: Mapping[int, int] | None = None):
  """Samples `gen_length` tokens after each prompt (SPEC §3).

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
    rng: a jax PRNG key or int seed (None = key 0); step t uses fold_in(rng, t).
    trace: also return a `Trace` (canvas after every step, reveal confidences).
    constraints: {position in the generated part: token id}, fixed from the start.
  Returns:
    int32 [B, Lp + gen_length] ([Lp + gen_length] for a 1-D prompt), the prompt
    included; with trace=True, (tokens, trace).
  """
  cfg = model.config
  squeeze = np.ndim(prompt_ids) == 1
  prompt_BP, attn_BP = _as_batch(model, prompt_ids, attention_mask)
  settings = check_settings(
      cfg, prompt_BP.shape[1], steps=steps, gen_length=gen_length, block_length=block_length,
      temperature=temperature, cfg_scale=cfg_scale, remasking=remasking,
      logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
      trace=trace)
  constraint_G = _constraint_array(constraints, settings.gen_length, cfg.embedding_size)
  graphdef, state = nnx.split(model)
  out = _sample_loop_jit(
      graphdef, state, place_batch(model, prompt_BP), place_batch(model, attn_BP),
      as_key(rng), jnp.float32(temperature), jnp.float32(cfg_scale),
      None if constraint_G is None else jnp.asarray(constraint_G), s=settings)
  if squeeze:
    if trace:
      tokens, tr = out
      return tokens[0], Trace(tr.canvas_SBL[:, 0], tr.confidence_BL[0], tr.step_BL[0])
    return out[0]
  return out
