"""Compilations and latency of a multi-turn chat (`llada_jax.chat.Conversation`).

  python -m benchmarks.chat [--checkpoint tests/fixtures/llada_tiny] [--turns 10]
      [--max_sequence_length 4096] [--gen_length 128 --steps 128 --block_length 32]
      [--output out/chat.json]

Runs `--turns` user turns at the chat defaults and reports, per turn, the prompt
length, the bucket it was padded to, the seconds taken and the XLA programs
compiled (name, seconds), then the totals, and the same conversation rerun
warm (`--repeats` times: min / median / max seconds), as JSON. The context is raised to
`--max_sequence_length` (LLaDA-8B's 4096) so that ten turns of 128 tokens fit
in the tiny fixture; compilations depend only on the lengths and settings, not
on the model's size.
"""

from __future__ import annotations

from absl import app, flags

from benchmarks import common
from llada_jax.checkpoints import loading
from llada_jax.frontends import chat
from llada_jax.frontends import settings as settings_lib
from llada_jax.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
MESSAGES = ["What is a Python list?", "How do I sort it?", "And in reverse order?",
            "What does the key argument do?", "Show an example with tuples.",
            "What is a lambda?", "Is sorting stable?", "What is a dict?",
            "How do I iterate over its items?", "Thanks, summarise everything."]


def _define_flags():
  flags.DEFINE_string("checkpoint", "tests/fixtures/llada_tiny", "Model directory.")
  flags.DEFINE_integer("turns", 10, "User turns.")
  flags.DEFINE_integer("repeats", 3, "Warm reruns of the whole conversation (timed).")
  flags.DEFINE_integer("max_sequence_length", 4096, "Context length (overrides the config).")
  for name, default in chat.CHAT_DEFAULTS.items():
    flags.DEFINE_integer(name, default, f"generate's {name}.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def run(checkpoint_dir: str, turns: int, max_sequence_length: int, repeats: int = 0,
        **settings) -> dict:
  model = loading.load(checkpoint_dir, max_sequence_length=max_sequence_length)
  tok = load_tokenizer(checkpoint_dir)
  machine = common.machine()
  new_conversation = lambda: chat.Conversation(model, tok, {  # noqa: E731
      **settings_lib.SAMPLER_ARGS, "seed": 0, **chat.CHAT_DEFAULTS, **settings})

  def converse(conv):
    return [conv.reply(MESSAGES[turn % len(MESSAGES)]) for turn in range(turns)]

  conv = new_conversation()
  rows = []
  for turn, r in enumerate(converse(conv)):
    rows.append({"turn": turn + 1, "prompt_length": r.prompt_length, "bucket": r.bucket,
                 "seconds": r.seconds, "compiles": len(r.compiles),
                 "compile_seconds": sum(t for _, t in r.compiles),
                 "programs": [name for name, _ in r.compiles]})
  programs = [p for row in rows for p in row["programs"]]
  return {
      "checkpoint": checkpoint_dir, "turns": turns,
      "max_sequence_length": max_sequence_length, "settings": conv.settings,
      "per_turn": rows,
      "buckets": sorted({row["bucket"] for row in rows}),
      "compiles": len(programs),
      "sampler_compiles": sum("sample" in p for p in programs),
      "compile_seconds": sum(row["compile_seconds"] for row in rows),
      "seconds": sum(row["seconds"] for row in rows),
      # The same conversation again, everything compiled: min / median / max.
      "warm_conversation_seconds": (common.time_call(lambda: converse(new_conversation()),
                                                     repeats, warmup=0) if repeats else None),
      "machine": machine,
  }


def main(_):
  result = run(FLAGS.checkpoint, FLAGS.turns, FLAGS.max_sequence_length, FLAGS.repeats,
               **{name: getattr(FLAGS, name) for name in chat.CHAT_DEFAULTS})
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
