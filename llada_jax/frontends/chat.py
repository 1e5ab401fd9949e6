"""Multi-turn chat in the terminal, as the reference chat.py (SPEC §6).

  python -m llada_jax.chat --checkpoint DIR|OWNER/NAME [--tokenizer DIR] [sampler flags]

Each user turn is rendered with the chat template; later turns drop their
leading BOS and are appended to the history, which is the previous prompt plus
answer with every EOS removed (EoT kept). Chat defaults as the reference:
gen_length = steps = 128, block_length 32 (block-diffusion models: steps and
block_length 32, threshold 0.95, LLaDA2's generate's); the sampler flags every front end
has (`settings.add_sampler_flags`) change them, and so does `/set` between
turns. Commands: /set name=value ..., /settings, /reset, /quit, /help. The
answer is printed as its blocks commit (`generate_stream`: one compiled call a
block; the tokens are `generate`'s).

The prompt is left-padded (with an attention mask) to the front ends' bucket
length (`settings.bucket_length`: the next power of two, here at least 64,
capped at max_sequence_length - gen_length), so a growing history reuses the
sampler compiled for its bucket instead of compiling a new program every turn.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax import monitoring

from llada_jax import errors
from llada_jax.checkpoints import layout, loading
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import Tokenizer, load_tokenizer

CHAT_DEFAULTS = {"gen_length": 128, "steps": 128, "block_length": 32}
# The shortest padded prompt: the first turns of a chat share one program.
MIN_BUCKET = 64
HELP = """commands:
  /set name=value ...  change sampler settings (e.g. /set steps=64 temperature=0.5)
  /settings            show the sampler settings
  /reset               forget the conversation
  /quit                leave (also Ctrl-D)"""


def next_history(tokens: Sequence[int], eos_id: int) -> list[int]:
  """The reference's history update: prompt + answer with every EOS removed (EoT kept)."""
  return [int(t) for t in tokens if t != eos_id]


def parse_settings(words: Sequence[str], settings: dict[str, Any], cfg=None) -> dict[str, Any]:
  """`name=value` words -> a copy of `settings` with them changed (ValueError naming
  the bad word). Names are generate's sampler arguments plus seed; with the model's
  config, the values are checked by its family's rules."""
  types = {**{k: settings_lib.OPTIONAL_TYPES.get(k, type(v))
              for k, v in settings_lib.SAMPLER_ARGS.items()}, "seed": int}
  out = dict(settings)
  if not words:
    raise ValueError("expected name=value, e.g. /set steps=64")
  for word in words:
    name, sep, text = word.partition("=")
    if not sep or name not in types:
      raise ValueError(f"{word!r}: expected name=value with name one of {', '.join(sorted(types))}")
    kind = types[name]
    try:
      if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
          raise ValueError
        out[name] = text.lower() in ("true", "1", "on", "yes")
      elif name in settings_lib.OPTIONAL_TYPES and text.lower() == "none":
        out[name] = None
      else:
        out[name] = kind(text)
    except ValueError:
      raise ValueError(f"{name}: {text!r} is not a valid {kind.__name__}") from None
  settings_lib.check_settings(out, cfg)
  return out


@contextlib.contextmanager
def count_compiles() -> Iterator[list[tuple[str, float]]]:
  """Records the XLA compilations inside the block: yields a list that fills with
  (function name, compile seconds) per compiled program."""
  programs: list[tuple[str, float]] = []

  def listener(name: str, secs: float, fun_name: str = "?", **_):
    if name == "/jax/core/compile/backend_compile_duration":
      programs.append((fun_name, secs))

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield programs
  finally:
    monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass
class Reply:
  text: str
  new_tokens: int
  prompt_length: int  # tokens of the prompt this turn (the history + the new turn)
  bucket: int  # the padded prompt length it ran at
  seconds: float
  compiles: list[tuple[str, float]]  # XLA programs compiled this turn (name, seconds)
  tokens_G: np.ndarray  # int32 [gen_length], the answer's ids
  trace: sampling.Trace | None = None  # with trace=True: of the answer only, numpy,
  #   canvas_SBL [steps, 1, gen_length], confidence_BL / step_BL [1, gen_length]


@dataclasses.dataclass
class Partial:
  """A turn so far, after a committed block."""
  text: str  # the answer's committed blocks
  trace: sampling.Trace | None = None  # with trace=True: the steps so far (as Reply's)


class Conversation:
  """The chat state: token history, sampler settings and the turn counter."""

  # What the too-long message tells the user to do (the web demo has buttons instead).
  too_long_hint = "/reset to start over, or /set a smaller gen_length."

  def __init__(self, model, tok: Tokenizer, settings: dict[str, Any]):
    self.model, self.tok, self.settings = model, tok, dict(settings)
    self.cfg = model.config
    self.history: list[int] = []
    self.turns = 0

  def reset(self) -> None:
    self.history, self.turns = [], 0

  def prompt_for(self, message: str) -> list[int]:
    """History + this turn's templated ids (after the first turn without its BOS or,
    for LLaDA2, its system turn: `continuation`)."""
    ids = self.tok.apply_chat_template([{"role": "user", "content": message}],
                                       continuation=bool(self.history))
    return self.history + ids

  def stream(self, message: str, trace: bool = False,
             constraints: dict[int, int] | None = None) -> Iterator[Partial | Reply]:
    """One turn (with generate's `trace` and `constraints`), a block at a time
    (`generate_stream`): yields a `Partial` after every committed block, then the
    `Reply`. ValueError (history unchanged) before any block when the prompt plus
    gen_length does not fit the model's context."""
    prompt = self.prompt_for(message)
    settings = dict(self.settings)
    seed, gen_length = settings.pop("seed"), settings["gen_length"]
    limit = self.cfg.max_sequence_length - gen_length
    if len(prompt) > limit:
      raise ValueError(
          f"the conversation is too long: {len(prompt)} prompt tokens + gen_length "
          f"{gen_length} exceed the model's context of {self.cfg.max_sequence_length} "
          f"tokens. {self.too_long_hint}")
    bucket = settings_lib.bucket_length(len(prompt), limit, floor=MIN_BUCKET)
    ids, _ = settings_lib.left_pad([prompt], bucket, self.cfg.pad_token_id)
    mask = (np.arange(bucket) >= bucket - len(prompt)).astype(np.int32)[None]
    rng = jax.random.fold_in(jax.random.key(seed), self.turns)
    start = time.perf_counter()
    with count_compiles() as compiles:
      for out in sampling.generate_stream(self.model, ids, mask, rng=rng, trace=trace,
                                          constraints=constraints, return_nfe=True,
                                          **settings):
        canvas, tr, steps = out if trace else (out[0], None, out[1])
        if tr is not None:  # the steps run so far
          tr = sampling.Trace(np.asarray(tr.canvas_SBL)[:steps, ..., bucket:],
                              *(np.asarray(a)[..., bucket:] for a in tr[1:]))
        answer = np.asarray(canvas)[0, bucket:]
        masked = np.flatnonzero(answer == self.cfg.mask_token_id)
        yield Partial(self.tok.decode(answer[:masked[0]] if masked.size else answer), tr)
    seconds = time.perf_counter() - start
    self.history = next_history(list(prompt) + answer.tolist(), self.cfg.eos_token_id)
    self.turns += 1
    if tr is not None:  # every step row, as generate's trace (rows after the last repeat it)
      tr = sampling.Trace(np.asarray(out[1].canvas_SBL)[..., bucket:], *tr[1:])
    yield Reply(self.tok.decode(answer), len(answer), len(prompt), bucket, seconds, compiles,
                answer, tr)

  def reply(self, message: str, trace: bool = False,
            constraints: dict[int, int] | None = None) -> Reply:
    """One whole turn: `stream`'s Reply."""
    *_, reply = self.stream(message, trace, constraints)
    return reply


def _show_settings(settings: dict[str, Any]) -> str:
  return " ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def _write_out(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def _print_turn(turn: Iterator[Partial | Reply], write_partial) -> Reply:
  """Prints `LLaDA: ` and the answer as its blocks commit -> the turn's Reply."""
  shown = None
  for item in turn:
    if isinstance(item, Reply):
      rest = item.text[len(shown or ""):] if item.text.startswith(shown or "") else (
          "\n" + item.text)  # a decode that changed as tokens joined: the whole answer
      write_partial(("LLaDA: " if shown is None else "") + rest)
      return item
    if shown is None:
      write_partial("LLaDA: ")
      shown = ""
    if item.text.startswith(shown):
      write_partial(item.text[len(shown):])
      shown = item.text
  raise AssertionError("a turn ends with its Reply")


def run(conv: Conversation, read=input, write=print, write_partial=_write_out) -> None:
  """The read-reply loop until /quit or end of input; answers are printed
  (`write_partial`, no newline) as their blocks commit."""
  write(f"LLaDA chat ({conv.cfg.max_sequence_length}-token context). /help for commands.")
  write(f"settings: {_show_settings(conv.settings)}")
  while True:
    try:
      line = read("You: ").strip()
    except (EOFError, KeyboardInterrupt):
      write("")
      return
    if not line:
      continue
    command, *words = line.split()
    if command == "/quit":
      return
    if command == "/reset":
      conv.reset()
      write("(conversation reset)")
    elif command == "/settings":
      write(f"settings: {_show_settings(conv.settings)}")
    elif command == "/help":
      write(HELP)
    elif command == "/set":
      try:
        conv.settings = parse_settings(words, conv.settings, conv.cfg)
        write(f"settings: {_show_settings(conv.settings)}")
      except ValueError as e:
        write(f"error: {e}")
    elif command.startswith("/"):
      write(f"error: unknown command {command}\n{HELP}")
    else:
      try:
        r = _print_turn(conv.stream(line), write_partial)
      except ValueError as e:
        write(f"error: {e}")
        continue
      write("")
      write(f"[{r.new_tokens} tokens in {r.seconds:.1f} s; history {len(conv.history)}/"
            f"{conv.cfg.max_sequence_length} tokens; prompt bucket {r.bucket}; "
            f"compiled {len(r.compiles)} programs in {sum(t for _, t in r.compiles):.1f} s]")


def front_end_parser(prog: str, description: str) -> argparse.ArgumentParser:
  """A parser with the model flags and the sampler flags at the chat defaults (the
  model family's for FAMILY_SETTINGS, filled by `load_front_end`)."""
  parser = argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  settings_lib.add_model_flags(parser)
  settings_lib.add_sampler_flags(parser)
  parser.set_defaults(**{k: v for k, v in CHAT_DEFAULTS.items()
                          if k not in settings_lib.FAMILY_SETTINGS})  # those: load_front_end
  return parser


def add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
  """--host and --port of a front end that listens."""
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
  parser.add_argument("--port", type=int, default=default_port)


def load_front_end(parser: argparse.ArgumentParser, args: argparse.Namespace):
  """Checks the flags (parser.error on bad ones) before loading anything heavy
  -> (model, tokenizer, sampler settings)."""
  try:
    checkpoint, tokenizer = settings_lib.model_paths(args.checkpoint, args.tokenizer)
    cfg = layout.read_config(checkpoint)  # no weights yet
    settings = settings_lib.with_family_defaults(settings_lib.sampler_settings(args),
                                                 cfg.family, dense=CHAT_DEFAULTS)
    settings_lib.check_settings(settings, cfg)
    tok = load_tokenizer(tokenizer)
    tok.apply_chat_template([])  # the chat tokens exist
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  return loading.load(checkpoint, dtype=args.dtype), tok, settings


@errors.report_errors("python -m llada_jax.chat")
def main(argv: Sequence[str] | None = None) -> int:
  parser = front_end_parser("python -m llada_jax.chat", __doc__.split("\n\n")[0])
  model, tok, settings = load_front_end(parser, parser.parse_args(argv))
  with contextlib.suppress(ImportError):
    import readline  # pylint: disable=g-import-not-at-top,unused-import  (line editing in input())
  run(Conversation(model, tok, settings))
  return 0


if __name__ == "__main__":
  sys.exit(main())
