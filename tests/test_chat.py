"""The terminal chat: history rule, prompt buckets, settings, and a user session in a pty."""

import os
import pathlib
import re
import sys

import numpy as np
import pexpect
import pytest

import llada_jax
from llada_jax.frontends import chat
from llada_jax.frontends import settings
from llada_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"gen_length": 16, "steps": 8, "block_length": 8}


def _settings(**changes):
  return {**settings.SAMPLER_ARGS, "seed": 0, **chat.CHAT_DEFAULTS, **changes}


def test_chat_buckets():
  """The front ends' rule with a floor of 64: a growing history changes bucket only
  when it doubles."""
  bucket = lambda n, limit: settings.bucket_length(n, limit, floor=chat.MIN_BUCKET)
  assert [bucket(n, 3968) for n in (1, 64, 65, 300, 1000)] == [64, 64, 128, 512, 1024]
  assert bucket(300, 384) == 384  # capped by the context
  # Ten turns of 140 tokens: 5 buckets.
  assert len({bucket(30 + 140 * turn, 3968) for turn in range(10)}) == 5


def test_parse_settings():
  base = _settings()
  out = chat.parse_settings(["steps=64", "temperature=0.5", "logits_eos_inf=true", "seed=7"],
                            base)
  assert (out["steps"], out["temperature"], out["logits_eos_inf"], out["seed"]) == (
      64, 0.5, True, 7)
  assert base["steps"] == 128  # a copy
  fast = chat.parse_settings(["cache=dual", "threshold=0.9", "cache_refresh=4"], base)
  assert (fast["cache"], fast["threshold"], fast["cache_refresh"]) == ("dual", 0.9, 4)
  assert chat.parse_settings(["threshold=none"], fast)["threshold"] is None
  for words, message in ((["steps=x"], "steps: 'x' is not a valid int"),
                         (["foo=1"], "name one of"), (["steps"], "expected name=value"),
                         (["steps=3"], "multiple of the number of blocks"),
                         (["remasking=best"], "remasking"),
                         (["logits_eos_inf=maybe"], "logits_eos_inf"), ([], "name=value"),
                         (["threshold=high"], "threshold: 'high' is not a valid float"),
                         (["cache=all"], "cache")):
    with pytest.raises(ValueError, match=re.escape(message)):
      chat.parse_settings(words, base)


def test_turns_follow_the_reference(tiny_model, fixture_dir):
  """Turn 1 = generate on the unpadded template; the history is prompt + answer minus
  EOS; turn 2's prompt is the history + the templated turn without its BOS."""
  tok = load_tokenizer(fixture_dir)
  conv = chat.Conversation(tiny_model, tok, _settings(**SMALL))
  first = tok.apply_chat_template([{"role": "user", "content": "def f(x):"}])
  r1 = conv.reply("def f(x):")
  out = np.asarray(llada_jax.generate(tiny_model, np.asarray(first), **SMALL))
  assert r1.text == tok.decode(out[len(first):])  # bucket padding changes nothing
  assert r1.bucket == 64 and r1.prompt_length == len(first)
  eos = tiny_model.config.eos_token_id
  assert conv.history == [int(t) for t in out if t != eos]

  second = tok.apply_chat_template([{"role": "user", "content": "import os"}])
  assert conv.prompt_for("import os") == conv.history + second[1:]
  history = conv.history
  r2 = conv.reply("import os")
  assert r2.bucket == 64 and r2.compiles == []  # same bucket, same settings: no compile
  out2 = np.asarray(llada_jax.generate(tiny_model, np.asarray(history + second[1:]), **SMALL))
  assert r2.text == tok.decode(out2[len(history) + len(second) - 1:])
  conv.reset()
  assert conv.history == [] and conv.prompt_for("x")[0] == tok.bos_id


def test_too_long_conversation_is_refused(tiny_model, fixture_dir):
  conv = chat.Conversation(tiny_model, load_tokenizer(fixture_dir),
                           _settings(gen_length=512, steps=8, block_length=512))
  with pytest.raises(ValueError, match="too long.*exceed the model's context of 512"):
    conv.reply("hello")
  assert conv.history == [] and conv.turns == 0


# pexpect forks then execs at once, which is safe in a multithreaded (JAX) process.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_terminal_session(fixture_dir):
  """A user's session in a pseudo-terminal: turns, /set, an error, overflow, /reset, /quit."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  flags = [f"--{k}={v}" for k, v in SMALL.items()]
  term = pexpect.spawn(sys.executable, ["-m", "llada_jax.chat", "--checkpoint", fixture_dir]
                       + flags, cwd=str(ROOT), env=env, encoding="utf-8", timeout=120,
                       dimensions=(40, 200))
  try:
    term.expect("512-token context")
    term.expect("gen_length=16 .*steps=8")

    def say(line, *expected):
      term.expect_exact("You: ")
      term.sendline(line)
      for pattern in expected:
        term.expect(pattern)
      return term

    say("def f(x):", r"LLaDA: ", r"\[16 tokens in [\d.]+ s; history \d+/512 tokens; "
        r"prompt bucket 64; compiled [1-9]\d* programs")
    say("and g?", r"LLaDA: ", r"prompt bucket 64; compiled 0 programs")  # reused
    say("/set steps=4 temperature=0.7", r"settings: .*steps=4 .*temperature=0.7")
    say("/set steps=3", r"error: steps: 3 is not a multiple")
    say("third turn", r"LLaDA: ", r"\[16 tokens")
    say("/set gen_length=512 block_length=512", r"gen_length=512")
    say("too long now", r"error: the conversation is too long: \d+ prompt tokens \+ "
        r"gen_length 512 exceed the model's context of 512 tokens")
    say("/oops", r"unknown command /oops")
    say("/reset", r"\(conversation reset\)")
    say("/set gen_length=16 block_length=8", r"gen_length=16")
    say("hello again", r"LLaDA: ", r"history \d+/512")
    say("/quit")
    term.expect(pexpect.EOF)
  finally:
    term.close()
  assert term.exitstatus == 0, term.before


def test_answer_streams_block_by_block(tiny_model, fixture_dir):
  """A turn yields the committed text after each of its blocks (growing prefixes of
  the answer), then the Reply, whose text the terminal has printed by then."""
  tok = load_tokenizer(fixture_dir)
  settings = _settings(gen_length=16, steps=8, block_length=4)
  items = list(chat.Conversation(tiny_model, tok, settings).stream("def f(x):", trace=True))
  *partials, reply = items
  assert len(partials) == 4 and isinstance(reply, chat.Reply)
  assert [len(p.trace.canvas_SBL) for p in partials] == [2, 4, 6, 8]  # steps so far
  texts = [p.text for p in partials]
  assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == reply.text
  printed = []
  again = chat._print_turn(chat.Conversation(tiny_model, tok, settings).stream("def f(x):"),
                           printed.append)
  assert again.text == reply.text  # traced or not, the same answer
  assert "".join(printed) == "LLaDA: " + again.text and len(printed) >= 2
