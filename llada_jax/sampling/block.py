"""Block-diffusion `generate` (LLaDA2.x), with an exact KV cache of committed blocks.

The official generate (`modeling_llada2_moe.py` / `modeling_llada21_moe.py`):
the canvas is the prompt then MASK up to whole blocks of `block_length`,
counted from position 0, so the block holding the prompt's tail is decoded
with the first new tokens; attention is block-causal (a block sees itself
and every earlier block). Blocks are decoded one after another:

- LLaDA2.0 rule (`editing_threshold=None`): at most `steps` iterations per
  block; iteration i has a quota n_i (the block split evenly over `steps`,
  the remainder to the first ones). If at least n_i masked positions have
  confidence (softmax probability of the chosen token) strictly above
  `threshold`, all of those are committed, else the n_i most confident
  (`threshold=0` commits every masked position at once; above 1 always n_i).
- LLaDA2.1 rule (`editing_threshold` set): each iteration commits by the same
  rule with n = `num_to_transfer`, and rewrites already decoded, non-prompt
  positions of the block whose argmax changed and whose probability exceeds
  `editing_threshold`; a block ends when it has no mask and nothing was
  edited, or after `max_post_steps` iterations without masks.

The official code recomputes the whole prefix every iteration. Here the whole
prompt blocks are run once (a prefill) and every block's keys/values are
written into a cache when it is committed, never recomputed: with block-causal
attention a committed block's keys/values do not depend on anything after it,
so the cache is exact. The commit is fused into the next block's first
iteration (a window of 2 blocks: the committed one and the new one), so the
model calls are the official ones plus the prefill. `kv_cache=False` instead
runs the whole canvas every iteration under the same mask (the reference the
cache is tested against).

Batches: row b's prompt (left-padded with `attention_mask`) is placed at
position 0 of its own canvas, so every row decodes exactly what it would
alone; rows run block by block in lockstep, a row without masks in a block
idles. `generate` is one jitted program (`lax.while_loop`s over blocks and
iterations, static shapes); compiled once per (batch, prompt width, settings).
`generate_stream` runs the same loop body one jitted call per block, the state
(canvas, KV cache, NFE) carried between calls, and yields after every block.

Outputs follow `sampler.generate`: [B, P + gen_length] with the prompt as
given; generated positions after a row's first EOS are EOS (the official
output is cut there), so `stop_at_eos` (skip the blocks after a block in which
every row holds EOS, as the official code does) never changes the tokens.
NFE = model calls (the prefill counts one).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.sampling import decoding
from llada_jax.sampling import kv_cache as kv_cache_lib
from llada_jax.sampling import sampler as dense

# The released defaults (LLaDA2.0 README / generate signature).
DEFAULTS = {"steps": 32, "block_length": 32, "threshold": 0.95, "max_post_steps": 16,
            "num_to_transfer": 1}
# Settings of dense LLaDA sampling, with the value that means "off" on a block model.
DENSE_ONLY = {"cfg_scale": 0.0, "remasking": "low_confidence", "logits_eos_inf": False,
              "confidence_eos_eot_inf": False, "cache": "none", "cache_refresh": None,
              "factor": None, "trace": False, "constraints": None}


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The static (compile-time) part of a block-diffusion `generate` call: shapes."""
  gen_length: int
  block_length: int
  kv_cache: bool
  num_blocks: int  # of the canvas (>= 2, so the 2-block commit window fits)
  prefill: int  # positions run once before decoding: whole blocks of the prompt width

  @property
  def canvas(self) -> int:
    return self.num_blocks * self.block_length


class Knobs(NamedTuple):
  """The traced settings (changing them does not recompile).

  Both rules are one loop: LLaDA2.0 is LLaDA2.1 with quota(i) for n, no edits
  (editing_threshold = inf), max_post_steps = 0 and at most `steps` iterations.
  """
  temperature: jax.Array  # float32
  threshold: jax.Array  # float32
  editing: jax.Array  # bool: the LLaDA2.1 rule
  editing_threshold: jax.Array  # float32 (inf: no edits)
  steps: jax.Array  # int32: iterations per block at most (LLaDA2.0's quota uses it)
  max_post_steps: jax.Array  # int32
  num_to_transfer: jax.Array  # int32 (LLaDA2.1)
  stop_at_eos: jax.Array  # bool


class _Carry(NamedTuple):
  x_BS: jax.Array  # the canvas
  cache: Any  # KVCache or None
  nfe: jax.Array  # int32 model calls so far


def _block_logits(model, c: _Carry, k, s: BlockSettings, first: bool, segments):
  """float32 logits [B, b, V] of block k, and the cache (`segments`: the model's
  `segments_for_loop()`).

  With the cache, the first iteration of a block runs blocks k-1 and k (the
  window writes block k-1's final keys/values; for k = 0 it runs blocks 0, 1,
  whose block 1 is rewritten later), the others block k only.
  """
  bl = s.block_length
  if not s.kv_cache:
    logits_BSV = model.forward(c.x_BS, None, block_length=bl, segments=segments)
    return jax.lax.dynamic_slice_in_dim(logits_BSV, k * bl, bl, axis=1), c.cache
  start = jnp.maximum(k - 1, 0) * bl if first else k * bl
  ids_BW = jax.lax.dynamic_slice_in_dim(c.x_BS, start, 2 * bl if first else bl, axis=1)
  logits_BWV, cache = model.forward_window(ids_BW, start, c.cache, block_length=bl,
                                           segments=segments)
  return jax.lax.dynamic_slice_in_dim(logits_BWV, k * bl - start, bl, axis=1), cache


def _choose(logits_BbV, key, temperature):
  """(token [B, b], its probability [B, b]): argmax at temperature 0, else a sample
  of softmax(logits / T) (Gumbel-max, float32); the probability is the tempered one."""
  def sample(logits_BbV):
    logits_BbV = logits_BbV / temperature
    g_BbV = jax.random.gumbel(key, logits_BbV.shape, jnp.float32)
    return decoding.first_argmax(logits_BbV + g_BbV), logits_BbV

  def greedy(logits_BbV):
    return decoding.first_argmax(logits_BbV), logits_BbV

  x0_Bb, logits_BbV = jax.lax.cond(temperature > 0, sample, greedy, logits_BbV)
  probs_BbV = jax.nn.softmax(logits_BbV, axis=-1)
  return x0_Bb, jnp.take_along_axis(probs_BbV, x0_Bb[..., None], axis=-1)[..., 0]


def transfer_mask(conf_Bb: jax.Array, masked_Bb: jax.Array, n, threshold) -> jax.Array:
  """bool [B, b]: LLaDA2's commit rule per row. If at least n masked positions have
  confidence > threshold, all of those; else the min(n, #masked) most confident."""
  conf_Bb = jnp.where(masked_Bb, conf_Bb, -jnp.inf)
  high_Bb = masked_Bb & (conf_Bb > threshold)
  n_B = jnp.broadcast_to(jnp.asarray(n, jnp.int32), conf_Bb.shape[:1])
  k_B = jnp.minimum(n_B, jnp.sum(masked_Bb, axis=1, dtype=jnp.int32))
  top_Bb = decoding.topk_mask(conf_Bb, k_B, masked_Bb)
  enough_B = jnp.sum(high_Bb, axis=1, dtype=jnp.int32) >= n_B
  return jnp.where(enough_B[:, None], high_Bb, top_Bb)


def quota(block_length: int, steps, i):
  """LLaDA2.0's tokens to commit at iteration i: block_length split over `steps`
  (block_length // steps each, one more for the first block_length % steps)."""
  return block_length // steps + (i < block_length % steps).astype(jnp.int32)


class _Blocks(NamedTuple):
  """The block loop's state."""
  k: jax.Array  # int32: the next block
  c: _Carry
  stopped_B: jax.Array  # bool: rows done (stop_at_eos)


def _loop_parts(model, fixed_BS, len_B, rng, kn: Knobs, s: BlockSettings):
  """(block_body, block_cond) of the loop over blocks: body decodes block k (when a
  live row has a mask there) and moves on; cond says whether block k is still due."""
  cfg = model.config
  mask_id, eos_id, bl = cfg.mask_token_id, cfg.eos_token_id, s.block_length
  B = fixed_BS.shape[0]
  pos_S = jnp.arange(s.canvas, dtype=jnp.int32)
  end_B = -(-(len_B + s.gen_length) // bl) * bl  # each row's canvas end (whole blocks)

  def block_of(x_BS, k):
    return jax.lax.dynamic_slice_in_dim(x_BS, k * bl, bl, axis=1)

  def decode_block(c: _Carry, k, live_B):
    """Iterations on block k until every row is done: a row ends when it had no mask
    and nothing was edited, or after max_post_steps iterations without masks, or
    after `steps` iterations (LLaDA2.0); each commits n masked positions by
    `transfer_mask` and rewrites changed, confident, decoded ones (LLaDA2.1)."""
    fixed_Bb = block_of(fixed_BS, k)
    segments = model.segments_for_loop()  # per-layer weights made once a block on CPU

    def pre(c, post_B, done_B):
      has_B = jnp.any(block_of(c.x_BS, k) == mask_id, axis=1)
      post_B = post_B + (~done_B & ~has_B)
      return post_B, done_B | (post_B > kn.max_post_steps), has_B

    def step(st, first):
      i, c, post_B, done_B = st
      post_B, done_B, has_B = pre(c, post_B, done_B)
      logits_BbV, cache = _block_logits(model, c, k, s, first, segments)
      x0_Bb, p_Bb = _choose(logits_BbV, jax.random.fold_in(jax.random.fold_in(rng, k), i),
                            kn.temperature)
      blk_Bb = block_of(c.x_BS, k)
      n = jnp.where(kn.editing, kn.num_to_transfer, quota(bl, kn.steps, i))
      commit_Bb = transfer_mask(p_Bb, (blk_Bb == mask_id) & ~done_B[:, None], n, kn.threshold)
      edit_Bb = ((blk_Bb != mask_id) & ~fixed_Bb & ~done_B[:, None]
                 & (p_Bb > kn.editing_threshold) & (x0_Bb != blk_Bb))
      blk_Bb = jnp.where(commit_Bb | edit_Bb, x0_Bb, blk_Bb)
      c = _Carry(jax.lax.dynamic_update_slice_in_dim(c.x_BS, blk_Bb, k * bl, axis=1), cache,
                 c.nfe + 1)
      return i + 1, c, post_B, done_B | (~has_B & ~jnp.any(edit_Bb, axis=1))

    has_B = jnp.any(block_of(c.x_BS, k) == mask_id, axis=1)
    st = step((jnp.int32(0), c, jnp.zeros((B,), jnp.int32), ~(live_B & has_B)), True)
    cond = lambda st: (st[0] < kn.steps) & jnp.any(~pre(*st[1:])[1])
    return jax.lax.while_loop(cond, lambda st: step(st, False), st)[1]

  def stopped_after(x_BS, k):
    """Rows whose generated part up to block k holds EOS (LLaDA2.1: and no mask)."""
    gen_BS = (pos_S >= len_B[:, None]) & (pos_S < (k + 1) * bl)
    no_mask_B = ~kn.editing | ~jnp.any((x_BS == mask_id) & gen_BS, axis=1)
    return kn.stop_at_eos & no_mask_B & jnp.any((x_BS == eos_id) & gen_BS, axis=1)

  def block_body(st: _Blocks) -> _Blocks:
    k, c, stopped_B = st
    live_B = ~stopped_B
    run = jnp.any((block_of(c.x_BS, k) == mask_id) & live_B[:, None])
    c = jax.lax.cond(run, lambda c: decode_block(c, k, live_B), lambda c: c, c)
    return _Blocks(k + 1, c, stopped_B | stopped_after(c.x_BS, k))

  def block_cond(st: _Blocks):
    return (st.k < s.num_blocks) & jnp.any(~st.stopped_B & (st.k * bl < end_B))

  return block_body, block_cond


def _start(graphdef, state, x_BS, s: BlockSettings) -> _Blocks:
  """The loop's first state: block 0 next, the whole prompt blocks in the cache."""
  model = nnx.merge(graphdef, state)
  cache, nfe = None, jnp.int32(0)
  if s.kv_cache:
    cache = kv_cache_lib.empty_cache(model.config, x_BS.shape[0], s.canvas)
    if s.prefill:
      _, cache = model.forward_window(x_BS[:, :s.prefill], 0, cache, block_length=s.block_length)
      nfe = jnp.int32(1)
  return _Blocks(jnp.int32(0), _Carry(x_BS, cache, nfe), jnp.zeros((x_BS.shape[0],), bool))


def _run(graphdef, state, x_BS, fixed_BS, len_B, rng, kn: Knobs, s: BlockSettings):
  """The whole sampler -> (final canvas [B, S], NFE)."""
  body, cond = _loop_parts(nnx.merge(graphdef, state), fixed_BS, len_B, rng, kn, s)
  c = jax.lax.while_loop(cond, body, _start(graphdef, state, x_BS, s)).c
  return c.x_BS, c.nfe


def _run_block(graphdef, state, st: _Blocks, fixed_BS, len_B, rng, kn: Knobs,
               s: BlockSettings) -> tuple[_Blocks, jax.Array]:
  """One turn of `_run`'s loop (block st.k, due) -> (the next state, another block due?)."""
  body, cond = _loop_parts(nnx.merge(graphdef, state), fixed_BS, len_B, rng, kn, s)
  st = body(st)
  return st, cond(st)


_run_jit = jax.jit(_run, static_argnames=("s",))
_start_jit = jax.jit(_start, static_argnames=("s",))
_run_block_jit = jax.jit(_run_block, static_argnames=("s",))


def _finite(name: str, value, minimum: float = 0.0) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
      np.isfinite(value) and value >= minimum):
    raise ValueError(f"{name}: expected a finite number >= {minimum}, got {value!r}")
  return float(value)


def _count(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
  return int(value)


def check_dense_only(settings: dict) -> None:
  """ValueError naming a dense-LLaDA setting given a value a block model does not support."""
  for name, value in settings.items():
    if name not in DENSE_ONLY:
      raise TypeError(f"generate() got an unexpected keyword argument {name!r}")
    off = DENSE_ONLY[name]
    if value is off or (off is not None and value is not None and value == off) or (
        name == "constraints" and not value):
      continue
    if name == "cache":
      why = (f"cache={value!r} is a KV cache of dense LLaDA sampling; block-diffusion "
             "models always cache committed blocks exactly (leave cache='none')")
    else:
      why = (f"{name}={value!r} is a setting of dense LLaDA sampling; block-diffusion "
             f"models (llada2) do not support it (leave {name}={off!r})")
    raise ValueError(f"{name}: {why}")


def check_settings(cfg, prompt_BP: np.ndarray, *, steps, gen_length, block_length,
                   temperature, threshold, editing_threshold, max_post_steps,
                   num_to_transfer, stop_at_eos, return_nfe, kv_cache
                   ) -> tuple[BlockSettings, Knobs]:
  """Validates the block sampler's settings (ValueError naming the argument)."""
  steps = dense.positive_int("steps", steps)
  gen_length = dense.positive_int("gen_length", gen_length)
  block_length = dense.positive_int("block_length", block_length)
  if gen_length % block_length:
    raise ValueError(f"block_length: gen_length={gen_length} is not a multiple of "
                     f"block_length={block_length}")
  editing = editing_threshold is not None
  if not editing:
    for name, value in (("max_post_steps", max_post_steps),
                        ("num_to_transfer", num_to_transfer)):
      if value is not None:
        raise ValueError(f"{name}: a setting of LLaDA2.1 editing; it needs editing_threshold")
  else:
    _finite("editing_threshold", editing_threshold)
  for name, value in (("stop_at_eos", stop_at_eos), ("return_nfe", return_nfe),
                      ("kv_cache", kv_cache)):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name}: expected True or False, got {value!r}")
  P = prompt_BP.shape[1]
  length = -(-(P + gen_length) // block_length) * block_length
  if length > cfg.max_sequence_length:
    raise ValueError(f"prompt_ids: prompt length {P} + gen_length {gen_length} is {length} "
                     f"positions in whole blocks of block_length={block_length}, more than "
                     f"the block cache holds (max_sequence_length={cfg.max_sequence_length})")
  masks_at = np.argwhere(prompt_BP == cfg.mask_token_id)
  if masks_at.size:
    raise ValueError(f"prompt_ids: holds the mask id {cfg.mask_token_id} at {tuple(masks_at[0])};"
                     " block-diffusion generate decodes only after the prompt")
  default = lambda name, value: DEFAULTS[name] if value is None else value
  max_post_steps = _count("max_post_steps", default("max_post_steps", max_post_steps), 0)
  knobs = Knobs(
      temperature=jnp.float32(_finite("temperature", temperature)),
      threshold=jnp.float32(_finite("threshold", default("threshold", threshold))),
      editing=jnp.bool_(editing),
      editing_threshold=jnp.float32(editing_threshold if editing else jnp.inf),
      steps=jnp.int32(min(steps, gen_length) if not editing else np.iinfo(np.int32).max),
      max_post_steps=jnp.int32(max_post_steps if editing else 0),
      num_to_transfer=jnp.int32(_count("num_to_transfer",
                                       default("num_to_transfer", num_to_transfer), 1)),
      stop_at_eos=jnp.bool_(stop_at_eos))
  return BlockSettings(
      gen_length=gen_length, block_length=block_length, kv_cache=bool(kv_cache),
      num_blocks=max(length // block_length, 2),
      prefill=(P // block_length) * block_length if kv_cache else 0), knobs


def prompt_lengths(prompt_BP: np.ndarray, attn_BP: np.ndarray | None) -> np.ndarray:
  """int32 [B]: each row's prompt length (left padding checked)."""
  B, P = prompt_BP.shape
  if attn_BP is None:
    return np.full((B,), P, np.int32)
  len_B = attn_BP.sum(1).astype(np.int32)
  if not np.array_equal(attn_BP.astype(bool), np.arange(P)[None, :] >= (P - len_B)[:, None]):
    raise ValueError("attention_mask: rows must be left-padded (0s, then 1s)")
  return len_B


def _canvas(cfg, prompt_BP: np.ndarray, len_B: np.ndarray, s: BlockSettings):
  """(canvas [B, S], fixed [B, S]): each row's prompt at position 0, MASK up to its
  whole blocks of prompt + gen_length, EOS after them; fixed = prompt or after."""
  P = prompt_BP.shape[1]
  pos_S = np.arange(s.canvas)[None, :]
  end_B = -(-(len_B + s.gen_length) // s.block_length) * s.block_length
  x_BS = np.where(pos_S < end_B[:, None], cfg.mask_token_id, cfg.eos_token_id).astype(np.int32)
  for b, n in enumerate(len_B):
    x_BS[b, :n] = prompt_BP[b, P - n:]
  return x_BS, (pos_S < len_B[:, None]) | (pos_S >= end_B[:, None])


def _output(prompt_BP, x_BS, len_B, gen_length, eos_id):
  """[B, P + gen_length]: the prompt as given, then each row's generated tokens, EOS after
  its first EOS."""
  gen_BG = np.take_along_axis(x_BS, len_B[:, None] + np.arange(gen_length)[None, :], axis=1)
  after_BG = np.cumsum(gen_BG == eos_id, axis=1) - (gen_BG == eos_id) > 0
  return np.concatenate([prompt_BP, np.where(after_BG, eos_id, gen_BG)], axis=1)


def generate(model, prompt_ids, attention_mask=None, *, steps: int = DEFAULTS["steps"],
             gen_length: int = 128, block_length: int = DEFAULTS["block_length"],
             temperature: float = 0., threshold: float | None = None,
             editing_threshold: float | None = None, max_post_steps: int | None = None,
             num_to_transfer: int | None = None, stop_at_eos: bool = False,
             return_nfe: bool = False, rng: Any = None, kv_cache: bool = True,
             **dense_only):
  """Samples `gen_length` tokens after each prompt with the official block-diffusion rule.

  Args:
    model: a block-diffusion model (family llada2; its config gives MASK and EOS).
    prompt_ids: int [B, P] (left-padded when lengths differ) or [P].
    attention_mask: {0,1} [B, P], 0 = left padding; None = no padding.
    steps: LLaDA2.0 iterations per block at most (min(steps, gen_length)).
    gen_length, block_length: tokens to generate (a multiple of block_length);
      block size, blocks counted from position 0.
    temperature: 0 = argmax; > 0 = a sample of softmax(logits / T) (Gumbel-max,
      key fold_in(fold_in(rng, block), iteration)).
    threshold: commit every masked position with confidence > threshold when
      there are at least the quota of them (None: 0.95).
    editing_threshold: None = the LLaDA2.0 rule; a number = LLaDA2.1 editing
      (with max_post_steps, default 16, and num_to_transfer, default 1).
    stop_at_eos: after a block, stop the rows holding EOS in their generated part.
    return_nfe: also return the number of model calls.
    rng: a jax PRNG key or int seed (None = key 0).
    kv_cache: False recomputes the whole canvas every iteration (the reference).
    **dense_only: settings of dense LLaDA sampling (cfg_scale, factor, cache=
      "prefix"/"dual", ...): refused unless at their "off" value.
  Returns:
    int32 [B, P + gen_length] ([P + gen_length] for a 1-D prompt), the prompt
    included, and the NFE (int) with return_nfe=True.
  """
  squeeze, prompt_BP, len_B, s, knobs, inputs = _prepare(
      model, prompt_ids, attention_mask, dense_only, steps=steps, gen_length=gen_length,
      block_length=block_length, temperature=temperature, threshold=threshold,
      editing_threshold=editing_threshold, max_post_steps=max_post_steps,
      num_to_transfer=num_to_transfer, stop_at_eos=stop_at_eos, return_nfe=return_nfe,
      kv_cache=kv_cache, rng=rng)
  graphdef, state = nnx.split(model)
  x_BS, nfe = _run_jit(graphdef, state, *inputs, knobs, s=s)
  tokens = _output(prompt_BP, np.asarray(x_BS), len_B, s.gen_length, model.config.eos_token_id)
  return _returned(jnp.asarray(tokens), nfe, squeeze, return_nfe)


def generate_stream(model, prompt_ids, attention_mask=None, **kwargs) -> Iterator[Any]:
  """`generate`, a block at a time: yields the output after every decoded block.

  Arguments: `generate`'s (names and defaults), checked when called, before any
  block runs. The prefill is one jitted call and each block another (the loop
  body of `generate`'s program, the KV cache carried between calls; compiled once
  per shapes and settings, whatever the block), so the tokens are `generate`'s and
  the last output yielded is its output. With stop_at_eos the stream ends after
  the block where every row has stopped.

  Yields:
    numpy int32 [B, P + gen_length] ([P + gen_length] for a 1-D prompt): the
    prompt, the blocks decoded so far, MASK after them (EOS after a row's first
    EOS, as `generate`'s output); with return_nfe=True, (that, model calls so far).
  """
  bound = inspect.signature(generate).bind(model, prompt_ids, attention_mask, **kwargs)
  bound.apply_defaults()
  args = {k: v for k, v in bound.arguments.items()
          if k not in ("model", "prompt_ids", "attention_mask", "dense_only", "rng")}
  squeeze, prompt_BP, len_B, s, knobs, (x_BS, *inputs) = _prepare(
      model, prompt_ids, attention_mask, bound.arguments["dense_only"], rng=bound.arguments["rng"],
      **args)
  graphdef, state = nnx.split(model)
  eos_id = model.config.eos_token_id

  def blocks():
    st, more = _start_jit(graphdef, state, x_BS, s=s), True
    nfe = int(st.c.nfe)
    while more:
      st, more = _run_block_jit(graphdef, state, st, *inputs, knobs, s=s)
      nfe_before, nfe = nfe, int(st.c.nfe)
      if nfe > nfe_before or not more:  # a block decoded, or the end
        tokens = _output(prompt_BP, np.asarray(st.c.x_BS), len_B, s.gen_length, eos_id)
        yield _returned(tokens, st.c.nfe, squeeze, args["return_nfe"])

  return blocks()


def _prepare(model, prompt_ids, attention_mask, dense_only: dict, rng=None, **settings):
  """Checks a call's arguments -> (1-D prompt?, prompt [B, P], prompt lengths [B],
  BlockSettings, Knobs, the program's array inputs: canvas, fixed, lengths, key)."""
  check_dense_only(dense_only)
  cfg = model.config
  prompt_BP, attn_BP = dense.as_batch(model, prompt_ids, attention_mask)
  len_B = prompt_lengths(prompt_BP, attn_BP)
  s, knobs = check_settings(cfg, prompt_BP, **settings)
  x_BS, fixed_BS = _canvas(cfg, prompt_BP, len_B, s)
  inputs = (dense.place_batch(model, x_BS), dense.place_batch(model, fixed_BS),
            dense.place_batch(model, len_B), dense.as_key(rng))
  return np.ndim(prompt_ids) == 1, prompt_BP, len_B, s, knobs, inputs


def _returned(tokens_BT, nfe, squeeze: bool, return_nfe: bool):
  """generate's return value: tokens (the batch axis dropped if squeeze), (NFE)."""
  tokens = tokens_BT[0] if squeeze else tokens_BT
  return (tokens, int(nfe)) if return_nfe else tokens
