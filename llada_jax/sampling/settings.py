"""The static part of a `generate` call (`Settings`) and the checks of its arguments.

Every check raises a ValueError naming the argument, before anything compiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llada_jax.sampling import kv_cache
from llada_jax.sampling.common import check_ids, positive_int

REMASKING = ("low_confidence", "random")


# `generate` arguments only block-diffusion sampling (`sampling/block.py`) takes.
BLOCK_OPTIONS = ("editing_threshold", "max_post_steps", "num_to_transfer", "kv_cache")


def refuse_block_options(family: str, options: dict) -> None:
  """ValueError naming the settings of block-diffusion sampling given a value for a
  model of another `family` (None = unset); TypeError for a name that is none of them."""
  unknown = sorted(set(options) - set(BLOCK_OPTIONS))
  if unknown:
    raise TypeError(f"generate() got an unexpected keyword argument {unknown[0]!r}")
  given = [name for name, value in options.items() if value is not None]
  if given:
    raise ValueError(f"{', '.join(given)}: settings of block-diffusion models (llada2); "
                     f"{family} models do not take them")


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


def as_batch(model, prompt_ids, attention_mask) -> tuple[np.ndarray, np.ndarray | None]:
  """Host int32 prompt [B, Lp] and {0,1} mask (or None), checked."""
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


def constraint_array(constraints, gen_length: int, embedding_size: int) -> np.ndarray | None:
  """int32 [gen_length]: the constrained token of each position, -1 where free (None: none)."""
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
