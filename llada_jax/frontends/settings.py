"""What every front end shares: the sampler and model flags (a model is a
directory or a Hub id), the settings check, and the one rule that pads prompts
into few shapes.

Sampler flags carry `generate`'s argument names and defaults (taken from its
signature, so a new sampler setting becomes a flag everywhere) plus --seed.
The defaults of `FAMILY_SETTINGS` (steps, block_length, threshold) are the
model family's: unset (None) until the model's config is read, then
`with_family_defaults` fills them (dense: generate's or the front end's own;
block diffusion: the released LLaDA2 generate's, `block.DEFAULTS`).

Buckets. `jax.jit` compiles one program per prompt length and batch size, so
front ends pad prompts (left, masked: padding changes no token and no draw)
to few shapes. The one rule: a length goes up to the next power of two, at
least `floor`, at most `limit` (the longest prompt the context allows); a
batch goes up to the next power of two rows, at most `batch_size`.

- Few programs: lengths up to 4096 fall in at most 9 buckets (16 ... 4096), so
  a whole evaluation task or a JSONL file compiles a handful of programs per
  sampler setting, however varied its prompts.
- A growing chat history stays in one bucket for several turns: the sampler
  compiled for it is reused, and a new program is compiled only when the
  history doubles (5 sampler programs for a 10-turn chat at the defaults).
  Finer buckets (e.g. multiples of a granule) would recompile nearly every
  turn, as a turn adds gen_length (128) tokens.
- The price is compute on padding: < 2x on the prompt part, about 1.4x on
  average (2 ln 2 for lengths spread evenly over an octave; the generated part
  is never padded). Every new shape instead costs a whole compile of the
  model's program, and the shape count grows with the bucket count.
"""

from __future__ import annotations

import argparse
import inspect
import os
from typing import Any, Sequence

import numpy as np

from llada_jax.checkpoints import hub
from llada_jax.sampling import block
from llada_jax.sampling import kv_cache
from llada_jax.sampling import sampler as sampling
from llada_jax.sampling import settings as sampling_settings

# generate's sampler arguments and their defaults, from its signature; then the
# settings only block-diffusion models take (LLaDA2.1 editing; None: the released
# default), from block.generate's. Dense models refuse those when set.
SAMPLER_ARGS = {
    name: p.default for name, p in inspect.signature(sampling.generate).parameters.items()
    if p.kind == p.KEYWORD_ONLY and name not in ("rng", "trace", "constraints", "return_nfe")}
BLOCK_ARGS = {name: p.default for name, p in inspect.signature(block.generate).parameters.items()
              if name in sampling_settings.BLOCK_OPTIONS and name != "kv_cache"}
SAMPLER_ARGS.update(BLOCK_ARGS)
# Flags whose default is None: their value type.
OPTIONAL_TYPES = {"cache_refresh": int, "threshold": float, "factor": float,
                  "editing_threshold": float, "max_post_steps": int, "num_to_transfer": int}
LINE_SETTINGS = set(SAMPLER_ARGS) | {"seed"}
# Settings whose default depends on the model family (`family_defaults`).
FAMILY_SETTINGS = ("steps", "block_length", "threshold")
MIN_LENGTH = 16  # the shortest padded prompt


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
  """--steps --gen_length ... (generate's names and defaults) and --seed."""
  group = parser.add_argument_group("sampler (llada_jax.generate's arguments)")
  for name, default in SAMPLER_ARGS.items():
    if isinstance(default, bool):
      group.add_argument(f"--{name}", action="store_true")
    elif name == "remasking":
      group.add_argument(f"--{name}", default=default, choices=sampling.REMASKING)
    elif name == "cache":
      group.add_argument(f"--{name}", default=default, choices=kv_cache.CACHES)
    elif name in FAMILY_SETTINGS:
      group.add_argument(f"--{name}", type=OPTIONAL_TYPES.get(name, type(default)), default=None,
                         help="default: the model family's (dense: "
                         f"{default}; llada2: {block.DEFAULTS[name]})")
    elif default is None:
      group.add_argument(f"--{name}", type=OPTIONAL_TYPES[name], default=None)
    else:
      group.add_argument(f"--{name}", type=type(default), default=default)
  group.add_argument("--seed", type=int, default=0, help="PRNG seed (generate's rng)")


def sampler_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The sampler flags as a dict: generate's keyword arguments plus "seed"."""
  return {name: getattr(args, name) for name in LINE_SETTINGS}


def family_defaults(family: str, dense: dict[str, Any] | None = None) -> dict[str, Any]:
  """The defaults of FAMILY_SETTINGS for a model `family`: the released block-diffusion
  ones (`block.DEFAULTS`) for llada2, else `dense` (a front end's own) over generate's."""
  source = block.DEFAULTS if family == "llada2" else {**SAMPLER_ARGS, **(dense or {})}
  return {name: source[name] for name in FAMILY_SETTINGS}


def with_family_defaults(settings: dict[str, Any], family: str,
                         dense: dict[str, Any] | None = None) -> dict[str, Any]:
  """A copy of `settings` with each unset (None or absent) FAMILY_SETTINGS value at
  `family_defaults(family, dense)`."""
  defaults = family_defaults(family, dense)
  return {**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  """--checkpoint, --tokenizer, --dtype: the model a front end loads."""
  parser.add_argument("--checkpoint", required=True,
                      help="model directory (HF snapshot, converted checkpoint or training "
                      "workdir) or Hugging Face Hub id owner/name[@revision]")
  parser.add_argument("--tokenizer",
                      help="tokenizer directory, file or Hub id (default: --checkpoint's)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute and parameter dtype")


def model_paths(checkpoint: str, tokenizer: str | None = None,
                names: tuple[str, str] = ("--checkpoint: ", "--tokenizer: ")) -> tuple[str, str]:
  """Local (model directory, tokenizer path) of the model flags: a directory, or a Hub
  id (`hub.resolve_model_dir`: downloaded once into the Hub cache); the tokenizer
  defaults to the model directory. Errors start with the flag's name from `names`."""
  try:
    checkpoint = hub.resolve_model_dir(checkpoint)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"{names[0]}{e}") from e
  if tokenizer is None:
    return checkpoint, checkpoint
  if not os.path.exists(tokenizer) and hub.parse_hub_id(tokenizer):
    try:
      tokenizer = hub.resolve_model_dir(tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f"{names[1]}{e}") from e
  return checkpoint, tokenizer


def check_settings(settings: dict[str, Any], cfg=None, prompt_len: int = 0) -> None:
  """ValueError naming the bad setting of `settings` (generate's arguments + "seed");
  with a model config, also that a prompt of `prompt_len` tokens + gen_length fits.

  The rules are the model family's: block-diffusion models (llada2) are checked
  as `block.generate` checks them (dense-only settings refused), the others as
  the dense sampler does (block settings refused). Without a config, block
  settings mean a block model: only what needs no config is checked then.
  """
  for name in ("logits_eos_inf", "confidence_eos_eot_inf", "stop_at_eos"):
    if not isinstance(settings[name], bool):
      raise ValueError(f"{name}: expected true or false, got {settings[name]!r}")
  if isinstance(settings["seed"], bool) or not isinstance(settings["seed"], int):
    raise ValueError(f"seed: expected an integer, got {settings['seed']!r}")
  gen = {k: v for k, v in settings.items() if k != "seed"}
  options = {k: gen.pop(k, None) for k in BLOCK_ARGS}
  is_block = (cfg is not None and cfg.family == "llada2") or (
      cfg is None and any(v is not None for v in options.values()))
  gen = with_family_defaults(gen, "llada2" if is_block else "llada")
  if is_block:
    block.check_dense_only({k: v for k, v in gen.items() if k in block.DENSE_ONLY})
    if cfg is not None:
      block.check_settings(
          cfg, np.zeros((1, prompt_len), np.int32), **options, return_nfe=False,
          kv_cache=True, **{k: gen[k] for k in ("steps", "gen_length", "block_length",
                                                 "temperature", "threshold", "stop_at_eos")})
    return
  if cfg is not None:
    sampling_settings.refuse_block_options(cfg.family, options)
  sampling.check_settings(cfg, prompt_len, **gen)


def stop_at(text: str, until: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop sequence."""
  cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
  return text[:cut]


def bucket_length(n: int, limit: int | None = None, floor: int = MIN_LENGTH) -> int:
  """Padded length of an n-token prompt: the next power of two >= max(n, floor),
  capped at `limit` (ValueError when n > limit). See the module docstring."""
  if limit is not None and n > limit:
    raise ValueError(f"prompt length {n} exceeds the limit {limit}")
  length = 1 << (max(n, floor, 1) - 1).bit_length()
  return length if limit is None else min(length, limit)


def bucket_rows(n: int, batch_size: int) -> int:
  """Padded row count of a batch of n prompts: the next power of two, at most
  `batch_size` (the full batch)."""
  return min(batch_size, 1 << (n - 1).bit_length())


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int,
             num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """Left-pads id lists to `length` (and to `num_rows` rows by repeating the last):
  -> ids int32 [R, length], attention mask [R, length] (None when nothing is padded)."""
  rows = list(rows) + [rows[-1]] * ((num_rows or len(rows)) - len(rows))
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    ids[r, length - len(row):] = row
    mask[r, length - len(row):] = 1
  return ids, (None if mask.all() else mask)
