"""`generate` and `generate_stream`: LLaDA's masked-diffusion sampler (SPEC §3) and its
fast variants.

`generate` runs the whole loop — every block, every step — as a single jitted
XLA program (`loop.sample_loop`), compiled once per (model, batch, prompt
length, settings) and cached by `jax.jit`; nothing returns to the host between
steps. `generate_stream` runs the same blocks one jitted call each and yields
the canvas after every block, for front ends that show tokens as they come.
The settings are checked first (`settings.py`); the step's reveal rule is
`decoding.reveal`, the caches are `kv_cache.py`, randomness and NFE are as
`loop.py` documents.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.sampling import loop
from llada_jax.sampling.common import as_key, place_batch
from llada_jax.sampling.loop import Trace
from llada_jax.sampling.settings import (Settings, as_batch, check_settings, constraint_array,
                                         refuse_block_options)
# pylint: disable=unused-import  (re-exported: the front ends use them through this module)
from llada_jax.sampling.common import positive_int
from llada_jax.sampling.settings import REMASKING
# pylint: enable=unused-import

# graphdef is a static pytree node; Settings is hashable: one compile per shapes+settings.
_sample_loop_jit = jax.jit(loop.sample_loop, static_argnames=("s",))
_sample_start_jit = jax.jit(loop.sample_start, static_argnames=("s",))
_sample_block_jit = jax.jit(loop.sample_block, static_argnames=("s",))


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
    return_nfe: also return the number of model calls run (NFE, `loop.py`).
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
  refuse_block_options(model.config.family, block_options)
  args = {k: v for k, v in locals().items() if k != "block_options"}
  squeeze, settings, inputs = _prepare(model, prompt_ids, attention_mask, args)
  tokens, tr, nfe = _sample_loop_jit(*nnx.split(model), *inputs, s=settings)
  return _outputs(tokens, tr, nfe, squeeze, trace, return_nfe)


def generate_stream(model, prompt_ids, attention_mask=None, **kwargs) -> Iterator[Any]:
  """`generate`, one block at a time: yields the canvas after every block.

  Arguments: `generate`'s (the same names and defaults), checked when called,
  before the first block runs. Each block is one call of a jitted per-block
  program (compiled once per shapes and settings, whatever the block), so the
  host sees every block; the tokens are those of `generate` with the same
  arguments, and the last canvas yielded is its output. With stop_at_eos the
  stream ends after the block where every row has stopped (that canvas has the
  remaining blocks filled with EOS). Block-diffusion models (llada2) stream
  `block.generate_stream` with the arguments `generate` gives `block.generate`:
  a canvas per decoded block (no trace; the NFE as `generate`'s).

  Yields:
    numpy int32 [B, Lp + gen_length] ([Lp + gen_length] for a 1-D prompt): the
    prompt, the blocks so far, MASK after them; with trace=True, (canvas, the
    `Trace` of the steps so far, numpy); with return_nfe=True, the model calls
    so far (int) last, as `generate` returns them.
  """
  bound = inspect.signature(generate).bind(model, prompt_ids, attention_mask, **kwargs)
  bound.apply_defaults()
  args = bound.arguments
  if model.config.family == "llada2":  # block diffusion, generate's defaults
    from llada_jax.sampling import block  # pylint: disable=g-import-not-at-top
    return block.generate_stream(**{k: v for k, v in args.items() if k != "block_options"},
                                 **args["block_options"])
  trace, return_nfe = args["trace"], args["return_nfe"]
  squeeze, settings, inputs = _prepare(model, prompt_ids, attention_mask, args)
  graphdef, state = nnx.split(model)

  def blocks():
    c, consts = _sample_start_jit(graphdef, state, *inputs, s=settings)
    for b in range(settings.num_blocks):
      c, stopped, tr = _sample_block_jit(graphdef, state, c, consts, jnp.int32(b), s=settings)
      tr = None if tr is None else Trace(*map(np.asarray, tr))
      yield _outputs(np.asarray(c.x_BL), tr, c.steps_run, squeeze, trace, return_nfe)
      if settings.stop_at_eos and bool(stopped):
        return

  return blocks()


def _prepare(model, prompt_ids, attention_mask, kwargs: dict) -> tuple[bool, Settings, tuple]:
  """Checks a call's arguments -> (1-D prompt?, Settings, the sampler's array inputs:
  prompt, mask, key, temperature, cfg_scale, threshold / factor, constraints)."""
  cfg = model.config
  prompt_BP, attn_BP = as_batch(model, prompt_ids, attention_mask)
  names = ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking",
           "logits_eos_inf", "confidence_eos_eot_inf", "cache", "cache_refresh", "threshold",
           "factor", "stop_at_eos", "return_nfe", "trace")
  settings = check_settings(cfg, prompt_BP.shape[1], **{n: kwargs[n] for n in names})
  threshold, factor = kwargs["threshold"], kwargs["factor"]
  accept_value = threshold if factor is None else factor
  constraint_G = constraint_array(kwargs["constraints"], settings.gen_length,
                                  cfg.embedding_size)
  inputs = (place_batch(model, prompt_BP), place_batch(model, attn_BP), as_key(kwargs["rng"]),
            jnp.float32(kwargs["temperature"]), jnp.float32(kwargs["cfg_scale"]),
            jnp.float32(accept_value or 0.),
            None if constraint_G is None else jnp.asarray(constraint_G))
  return np.ndim(prompt_ids) == 1, settings, inputs


def _outputs(tokens, tr, nfe, squeeze: bool, trace: bool, return_nfe: bool):
  """generate's return value: tokens, (trace), (nfe), the batch axis dropped if squeeze."""
  if squeeze:
    tokens = tokens[0]
    if trace:
      tr = Trace(tr.canvas_SBL[:, 0], tr.confidence_BL[0], tr.step_BL[0])
  out = (tokens,) + ((tr,) if trace else ()) + ((int(nfe),) if return_nfe else ())
  return out[0] if len(out) == 1 else out
