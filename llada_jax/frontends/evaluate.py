"""lm-evaluation-harness model `llada_jax`: LLaDA on likelihood and generation tasks.

  python -m llada_jax.evaluate --model llada_jax \\
      --model_args checkpoint=DIR,mc_num=128,mc_batch_size=16,cfg=0.5 \\
      --tasks arc_challenge --batch_size 8 [any other lm_eval flag]

lm-eval 0.4's own `lm_eval` command cannot load a model registered by another
package, so this entry point registers the model and hands the command line
to lm-eval's CLI; a `gs://` --output_path is written locally by lm-eval and
uploaded when it returns (`local_output`). The class also works with `lm_eval.simple_evaluate(
model="llada_jax", model_args={...})` once this module is imported.

Model args: `checkpoint` (a model directory: HF snapshot, converted dir or
training workdir; or a Hub id owner/name[@revision]), `tokenizer` (default:
the checkpoint), `dtype`
(float32 | bfloat16), `mesh` (e.g. `1x-1x1`: data x fsdp x tensor, -1 = the
rest; default: one device), `mc_num` and `mc_batch_size` (SPEC §4's Monte Carlo
samples and mini-batch), `cfg` (likelihood guidance scale), `seed`,
`is_check_greedy`, `max_length` (default: the model's context), `padding`
(`bucket`: each batch padded to the front ends' length bucket, a power of
two, and its rows to a power of two, so that a task compiles few programs;
`longest`: to its longest request and its own row count), and every
`llada_jax.generate` setting under its own name (steps, gen_length,
block_length, temperature, cfg_scale, remasking, logits_eos_inf, ...; unset steps,
block_length and threshold at the model family's defaults, `settings.family_defaults`). lm-eval's
`--batch_size` is the number of requests scored or generated together.

- `loglikelihood`: the unbiased Monte Carlo ELBO of `llada_jax.log_likelihood`.
  Each group of `batch_size` requests (sorted by length, padded as `padding`
  says: padding is masked and changes no draw) is one call with `rng=seed`,
  so a request scored alone equals `log_likelihood(model, ctx_ids, cont_ids,
  rng=seed)` up to float rounding.
  `is_greedy` (off by default, as the reference recommends) is the reference's
  check: revealing the continuation one most-confident token at a time, which
  is `generate` with steps = gen_length = block_length = len(continuation).
- `loglikelihood_rolling`: the ELBO of the whole text, scored as the answer to
  a one-token prompt (BOS, else EOS); a lower bound on log p(text), so
  perplexities are upper bounds. Texts longer than `max_length` are cut into
  windows by lm-eval's rolling-window rule, each scored given the token before it.
- `generate_until`: left-padded batches of requests with equal settings;
  the output is cut at the first EOS / EoT token, then at the earliest stop
  sequence (`until`). Task `generation_kwargs` named like `generate`'s
  arguments override the model args per request; `max_gen_toks` and
  `do_sample` are ignored (the canvas is `gen_length`, sampling is
  `temperature` > 0), as in the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tqdm
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils

from llada_jax import paths
from llada_jax import sharding
from llada_jax import errors
from llada_jax.checkpoints import layout, loading
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import likelihood
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MODEL_NAME = "llada_jax"
# Model args other than the sampler's, with their defaults (None = none / the model's).
EVAL_ARGS = {"checkpoint": None, "tokenizer": None, "dtype": "float32", "mesh": None,
             "mc_num": 128, "mc_batch_size": 16, "cfg": 0.0, "seed": 0,
             "is_check_greedy": False, "max_length": None, "padding": "bucket"}
PADDING = ("bucket", "longest")
# Passed by lm-eval itself (--batch_size, --max_batch_size, --device).
HARNESS_ARGS = {"batch_size": None, "max_batch_size": None, "device": None}
IGNORED_GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample"})


def convert_arg(name: str, value: Any, default: Any) -> Any:
  """`value` (from a model_args string or dict) as the type of `default`."""
  if value is None or default is None:
    return value
  try:
    if isinstance(default, bool):
      if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
      if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
      raise ValueError
    if isinstance(default, int):
      as_float = float(value)
      if isinstance(value, bool) or as_float != int(as_float):
        raise ValueError
      return int(as_float)
    if isinstance(default, float):
      return float(value)
    return type(default)(value)
  except (TypeError, ValueError):
    raise ValueError(f"model_args: {name}={value!r} is not a valid "
                     f"{type(default).__name__}") from None


def parse_model_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """model_args -> (our settings, generate's settings); unknown names are an error."""
  known = {**EVAL_ARGS, **HARNESS_ARGS, **settings_lib.SAMPLER_ARGS}
  unknown = sorted(set(args) - set(known))
  if unknown:
    raise ValueError(f"model_args: unknown argument(s) {', '.join(unknown)}; accepted: "
                     f"{', '.join(sorted(known))}")
  out = {name: convert_arg(name, args.get(name, default), default)
         for name, default in {**EVAL_ARGS, **HARNESS_ARGS}.items()}
  if not out["checkpoint"]:
    raise ValueError("model_args: checkpoint=DIR is required")
  batch_size = out["batch_size"]
  if isinstance(batch_size, str) and batch_size.startswith("auto"):
    raise ValueError(f"--batch_size: {batch_size!r} is not supported; give a number of "
                     f"requests per batch")
  out["batch_size"] = sampling.positive_int("--batch_size", convert_arg(
      "--batch_size", 1 if batch_size is None else batch_size, 1))
  gen = {name: convert_arg(name, args.get(name, default), default)  # family's: filled below
         for name, default in settings_lib.SAMPLER_ARGS.items()
         if name in args or name not in settings_lib.FAMILY_SETTINGS}
  out["mc_num"] = sampling.positive_int("mc_num", out["mc_num"])
  out["mc_batch_size"] = min(sampling.positive_int("mc_batch_size", out["mc_batch_size"]),
                             out["mc_num"])
  if out["mc_num"] % out["mc_batch_size"]:
    raise ValueError(f"model_args: mc_num={out['mc_num']} is not a multiple of "
                     f"mc_batch_size={out['mc_batch_size']}")
  if not np.isfinite(out["cfg"]) or out["cfg"] < 0:
    raise ValueError(f"model_args: cfg={out['cfg']!r}: expected a finite number >= 0")
  if out["padding"] not in PADDING:
    raise ValueError(f"model_args: padding={out['padding']!r} is not one of {PADDING}")
  if out["dtype"] not in ("float32", "bfloat16"):
    raise ValueError(f"model_args: dtype={out['dtype']!r} is not float32 or bfloat16")
  if out["mesh"] is not None:
    parse_mesh(out["mesh"])
  if out["max_length"] is not None:
    out["max_length"] = sampling.positive_int(
        "max_length", convert_arg("max_length", out["max_length"], 0))
  try:  # last: a Hub id may download
    out["checkpoint"], out["tokenizer"] = settings_lib.model_paths(
        str(out["checkpoint"]), out["tokenizer"],
        names=("model_args: checkpoint=", "model_args: tokenizer="))
  except FileNotFoundError as e:
    raise ValueError(str(e)) from e
  # The sampler settings by the model family's rules, before any weights are loaded.
  cfg = layout.read_config(out["checkpoint"])
  gen = settings_lib.with_family_defaults(gen, cfg.family)
  settings_lib.check_settings({**gen, "seed": out["seed"]}, cfg)
  return out, gen


def parse_mesh(spec: str) -> tuple[int, ...]:
  """'DxFxT' -> (data, fsdp, tensor) mesh shape; -1 = the remaining devices."""
  try:
    shape = tuple(int(s) for s in str(spec).lower().split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise ValueError(f"model_args: mesh={spec!r}: expected DATAxFSDPxTENSOR, e.g. 1x-1x1")
  return shape


stop_at = settings_lib.stop_at  # the front ends' stop-sequence cut


def _chunks(order: list[int], size: int):
  for start in range(0, len(order), size):
    yield order[start:start + size]


@register_model(MODEL_NAME)
class LLaDAEval(LM):
  """lm-eval `LM` backed by a llada_jax model (see the module docstring)."""

  def __init__(self, **model_args):
    super().__init__()
    settings, self.gen_settings = parse_model_args(model_args)
    self.mc_num, self.mc_batch_size = settings["mc_num"], settings["mc_batch_size"]
    self.cfg = settings["cfg"]
    self.seed = settings["seed"]
    self.is_check_greedy = settings["is_check_greedy"]
    self.batch_size = settings["batch_size"]
    self.padding = settings["padding"]
    if settings["device"] is not None:
      log.info("device=%s ignored: JAX runs on its default backend (%s)", settings["device"],
               jax.default_backend())
    mesh = None if settings["mesh"] is None else sharding.make_mesh(parse_mesh(settings["mesh"]))
    self.tok = load_tokenizer(settings["tokenizer"])
    self.model = loading.load(settings["checkpoint"], dtype=settings["dtype"], mesh=mesh)
    cfg = self.model.config
    self.max_length = settings["max_length"] or cfg.max_sequence_length
    if not 2 <= self.max_length <= cfg.max_sequence_length:
      raise ValueError(f"model_args: max_length={self.max_length} must lie in "
                       f"[2, max_sequence_length={cfg.max_sequence_length}]")
    self.prefix_id = self.tok.bos_id if self.tok.bos_id is not None else cfg.eos_token_id
    self.stop_ids = {i for i in (cfg.eos_token_id, self.tok.eot_id) if i is not None}
    self._warned_gen_kwargs: set[str] = set()

  # --- tokenization -------------------------------------------------------------------------

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's rule: trailing spaces move to the continuation; the continuation's ids
    are those of context + continuation after the context's (no BOS, as the reference)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
      return [self.prefix_id], self.tok.encode(continuation)
    context_ids = self.tok.encode(context)
    return context_ids, self.tok.encode(context + continuation)[len(context_ids):]

  def _fit(self, context_ids: list[int], answer_ids: list[int], room: int) -> list[int]:
    """The context cut on the left so that context + answer fit in `room` tokens."""
    if len(answer_ids) >= room:
      raise ValueError(f"a continuation of {len(answer_ids)} tokens leaves no room for "
                       f"context within max_length={self.max_length}")
    return context_ids[max(0, len(context_ids) + len(answer_ids) - room):]

  def padded_shape(self, longest: int, rows: int, limit: int) -> tuple[int, int]:
    """(length, rows) a batch of `rows` requests, the longest `longest` tokens, is padded
    to: the front ends' buckets (`settings.bucket_length` capped at `limit`,
    `bucket_rows`), or itself with padding=longest."""
    if self.padding == "longest":
      return longest, rows
    return (settings_lib.bucket_length(longest, limit),
            settings_lib.bucket_rows(rows, self.batch_size))

  # --- likelihood ---------------------------------------------------------------------------

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> np.ndarray:
    """ELBO estimates of log p(answer | context) for (context ids, answer ids) pairs,
    `batch_size` pairs per `log_likelihood` call (sorted by length, in input order out)."""
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    out = np.zeros(len(pairs), np.float64)
    with tqdm.tqdm(total=len(pairs), desc=desc, unit="request") as bar:
      for chunk in _chunks(order, self.batch_size):
        length, _ = self.padded_shape(max(sum(map(len, pairs[i])) for i in chunk), len(chunk),
                                      self.model.config.max_sequence_length)
        out[chunk] = likelihood.log_likelihood(
            self.model, [pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk],
            mc_num=self.mc_num, batch_size=self.mc_batch_size, cfg_scale=self.cfg,
            rng=self.seed, pad_to=length)
        bar.update(len(chunk))
    return out

  def greedy_matches(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether revealing one most-confident token at a time reproduces each answer."""
    by_length: dict[int, list[int]] = {}
    for i, (_, answer) in enumerate(pairs):
      by_length.setdefault(len(answer), []).append(i)
    out = [False] * len(pairs)
    for length, members in by_length.items():
      for chunk in _chunks(members, self.batch_size):
        ids, mask = settings_lib.left_pad([pairs[i][0] for i in chunk],
                                    max(len(pairs[i][0]) for i in chunk), self.tok.pad_id)
        tokens = np.asarray(sampling.generate(
            self.model, ids, mask, steps=length, gen_length=length, block_length=length,
            cfg_scale=self.cfg))
        for row, i in enumerate(chunk):
          out[i] = bool((tokens[row, ids.shape[1]:] == pairs[i][1]).all())
    return out

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for req in requests:
      context_ids, answer_ids = self._encode_pair(*req.args)
      if not answer_ids:
        raise ValueError(f"loglikelihood: continuation {req.args[1]!r} encodes to no tokens")
      pairs.append((self._fit(context_ids, answer_ids, self.max_length), answer_ids))
    scores = self.score_pairs(pairs, "loglikelihood")
    greedy = self.greedy_matches(pairs) if self.is_check_greedy else [False] * len(pairs)
    results = [(float(s), g) for s, g in zip(scores, greedy)]
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, result)
    return results

  def loglikelihood_rolling(self, requests) -> list[float]:
    windows, owner = [], []
    for n, req in enumerate(requests):
      for window in lm_utils.get_rolling_token_windows(
          token_list=self.tok.encode(req.args[0]), prefix_token=self.prefix_id,
          max_seq_len=self.max_length - 1, context_len=1):
        windows.append(lm_utils.make_disjoint_window(window))
        owner.append(n)
    scores = self.score_pairs(windows, "loglikelihood_rolling") if windows else []
    totals = np.zeros(len(requests))
    np.add.at(totals, np.asarray(owner, np.int64), np.asarray(scores, np.float64))
    results = [float(t) for t in totals]
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
    return results

  # --- generation ---------------------------------------------------------------------------

  def _request_settings(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    ignored = set(gen_kwargs) - set(settings_lib.SAMPLER_ARGS) - IGNORED_GEN_KWARGS
    if ignored - self._warned_gen_kwargs:
      log.warning("generation kwargs %s are not llada_jax.generate settings; ignored",
                  sorted(ignored))
      self._warned_gen_kwargs |= ignored
    settings = {**self.gen_settings, **{
        k: convert_arg(k, v, settings_lib.SAMPLER_ARGS[k]) for k, v in gen_kwargs.items()
        if k in settings_lib.SAMPLER_ARGS}}
    return settings, until

  def _decode(self, ids: np.ndarray, until: list[str]) -> str:
    ends = [n for n, i in enumerate(ids.tolist()) if i in self.stop_ids]
    return stop_at(self.tok.decode(ids[:ends[0]] if ends else ids), until)

  def generate_until(self, requests) -> list[str]:
    jobs: dict[tuple, list[int]] = {}
    prompts, untils = [], []
    for n, req in enumerate(requests):
      context, gen_kwargs = req.args
      settings, until = self._request_settings(gen_kwargs)
      ids = self.tok.encode(context) or [self.prefix_id]
      ids = self._fit(ids, [0] * settings["gen_length"], self.max_length)
      settings_lib.check_settings({**settings, "seed": self.seed}, self.model.config, len(ids))
      prompts.append(ids)
      untils.append(until)
      jobs.setdefault(tuple(sorted(settings.items())), []).append(n)
    out = [""] * len(requests)
    with tqdm.tqdm(total=len(requests), desc="generate_until", unit="request") as bar:
      for b, (key, members) in enumerate(jobs.items()):
        members.sort(key=lambda n: -len(prompts[n]))
        for c, chunk in enumerate(_chunks(members, self.batch_size)):
          length, rows = self.padded_shape(
              len(prompts[chunk[0]]), len(chunk),
              self.model.config.max_sequence_length - dict(key)["gen_length"])
          ids, mask = settings_lib.left_pad([prompts[n] for n in chunk], length, self.tok.pad_id,
                                            rows)
          rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), b), c)
          tokens = np.asarray(sampling.generate(self.model, ids, mask, rng=rng, **dict(key)))
          for row, n in enumerate(chunk):
            out[n] = self._decode(tokens[row, length:], untils[n])
            self.cache_hook.add_partial("generate_until", requests[n].args, out[n])
          bar.update(len(chunk))
    return out

  # --- chat templates -----------------------------------------------------------------------

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tok, "path", type(self.tok).__name__)

  def chat_template(self, chat_template: bool | str = False) -> str:
    return "llada (SPEC §2)"

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The chat template (SPEC §2) as text; encoding it gives the template's ids."""
    ids = self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
    special = {i: self.tok.decode([i], skip_special=False) for i in self.tok.special_ids}
    text, run = [], []
    for i in ids + [None]:
      if i in special or i is None:
        text.append(self.tok.decode(run, skip_special=False))
        run = []
        if i is not None:
          text.append(special[i])
      else:
        run.append(i)
    return "".join(text)


@errors.report_errors("python -m llada_jax.evaluate")
def main(argv: Sequence[str] | None = None) -> None:
  """Checks our model args, then hands the command line to lm-eval's CLI (errors: one line;
  tracebacks with LLADA_DEBUG=1)."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  from lm_eval._cli.utils import MergeDictAction  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(prog="python -m llada_jax.evaluate", add_help=False)
  parser.add_argument("--model", "-M")
  parser.add_argument("--model_args", "-a", nargs="+", action=MergeDictAction)
  parser.add_argument("--output_path", "-o")
  known, _ = parser.parse_known_args(argv)
  if known.model == MODEL_NAME and known.model_args is not None:
    try:
      parse_model_args(known.model_args)
    except ValueError as e:
      parser.error(str(e))
  with local_output(known.output_path) as local_path:
    sys.argv = [sys.argv[0]] + with_output_path(argv, local_path)
    cli_evaluate()


def with_output_path(argv: list[str], path: str | None) -> list[str]:
  """argv with lm-eval's --output_path / -o value replaced by `path`."""
  out, args = [], iter(argv)
  for arg in args:
    if arg in ("--output_path", "-o"):
      out += [arg, path]
      next(args, None)
    elif arg.startswith("--output_path="):
      out.append(f"--output_path={path}")
    else:
      out.append(arg)
  return out


@contextlib.contextmanager
def local_output(output_path: str | None) -> Iterator[str | None]:
  """The path lm-eval (which writes with pathlib) is given for --output_path: the
  path itself when local; for a URL, the same name in a temp directory, whose
  files (results, --log_samples) are uploaded next to the URL when lm-eval returns."""
  if output_path is None or not paths.is_remote(output_path):
    yield output_path
    return
  url = output_path.rstrip("/")
  parent = os.path.dirname(url)
  paths.exists(url)  # no gcsfs / credentials: fail here, before anything is evaluated
  with tempfile.TemporaryDirectory(prefix="llada_jax-eval-") as tmp:
    yield os.path.join(tmp, os.path.basename(url))
    for name in paths.walk_files(tmp):
      paths.copyfile(os.path.join(tmp, name), os.path.join(parent, name))


if __name__ == "__main__":
  main()
