"""Command line sampling: one prompt, or a JSONL file of prompts in padded batches.

  python -m llada_jax.sample --checkpoint DIR|OWNER/NAME [--tokenizer DIR] --prompt "..." \\
      [--chat] [flags]
  python -m llada_jax.sample --checkpoint DIR --input prompts.jsonl --output out.jsonl \\
      [--batch_size 16] [--chat] [flags]

Sampler flags carry `generate`'s argument names (--steps --gen_length
--block_length --temperature --cfg_scale --remasking --logits_eos_inf
--confidence_eos_eot_inf, and the fast-sampling --cache --cache_refresh
--threshold --factor --stop_at_eos) plus --seed, from `llada_jax.frontends.settings`
as in every front end; unset --steps / --block_length / --threshold take the model
family's defaults (dense: generate's; LLaDA2: 32, 32, 0.95). Input lines are {"prompt": "..."} (chat-templated with
--chat) or {"messages": [{"role": ..., "content": ...}, ...]} (always
chat-templated), optionally with per-line sampler settings under the same
names. Same-settings prompts are sorted by length and left-padded into
batches of the front ends' buckets (`settings.bucket_length`, `bucket_rows`).
Each output line is the input object with "completion" added, in input order.
A bad line is reported with its number on stderr and skipped; the others
still run. Completions reach OUTPUT.partial as each batch finishes; after a
crash, `--resume` continues from there. Errors are one line (tracebacks: --verbose).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from llada_jax import errors
from llada_jax import paths
from llada_jax.checkpoints import layout
from llada_jax.frontends import completions
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import Tokenizer, load_tokenizer


def encode_request(tok: Tokenizer, record: Any, chat: bool) -> list[int]:
  """Prompt ids of one input object: {"prompt": str} or {"messages": [...]}."""
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  if "messages" in record:
    if not isinstance(record["messages"], list) or not record["messages"]:
      raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    return tok.apply_chat_template(record["messages"])
  if not isinstance(record.get("prompt"), str):
    raise ValueError('expected a "prompt" string or a "messages" list')
  if chat:
    return tok.apply_chat_template([{"role": "user", "content": record["prompt"]}])
  ids = tok.encode(record["prompt"])
  if not ids:
    raise ValueError('"prompt" encodes to no tokens')
  return ids


@dataclasses.dataclass
class _Request:
  index: int  # position among the good lines (output order)
  record: dict
  ids: list[int]
  settings: dict[str, Any]


def _batches(requests: list[_Request], batch_size: int):
  """Same-settings requests sorted by length, in chunks of `batch_size`."""
  groups: dict[tuple, list[_Request]] = {}
  for req in requests:
    groups.setdefault(tuple(sorted(req.settings.items())), []).append(req)
  for group in groups.values():
    group.sort(key=lambda r: len(r.ids))
    for start in range(0, len(group), batch_size):
      yield group[start:start + batch_size]


def generate_batch(model, tok: Tokenizer, batch: list[_Request], batch_size: int,
                   batch_index: int) -> list[str]:
  """Completions (decoded text) of requests sharing sampler settings, padded to
  the front ends' length and row buckets (`settings.bucket_length`, `bucket_rows`)."""
  settings = dict(batch[0].settings)
  seed = settings.pop("seed")
  limit = model.config.max_sequence_length - settings["gen_length"]
  length = settings_lib.bucket_length(max(len(r.ids) for r in batch), limit)
  num_rows = settings_lib.bucket_rows(len(batch), batch_size)
  ids, mask = settings_lib.left_pad([r.ids for r in batch], length, tok.pad_id, num_rows)
  rng = jax.random.fold_in(jax.random.key(seed), batch_index)
  out = np.asarray(sampling.generate(model, ids, mask, rng=rng, **settings))
  return [tok.decode(out[r, length:]) for r in range(len(batch))]


def _read_requests(path: str, tok: Tokenizer, cfg, chat: bool, defaults: dict[str, Any]):
  requests, bad = [], 0
  with paths.open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        ids = encode_request(tok, record, chat)
        settings = {**defaults, **{k: record[k] for k in settings_lib.LINE_SETTINGS & set(record)}}
        settings_lib.check_settings(settings, cfg, len(ids))
      except (ValueError, TypeError) as e:
        print(f"{path}:{line_no}: skipped: {e}", file=sys.stderr)
        bad += 1
        continue
      requests.append(_Request(len(requests), record, ids, settings))
  return requests, bad


def run_file(model, tok: Tokenizer, input_path: str, output_path: str, *, batch_size: int,
             chat: bool, defaults: dict[str, Any], resume: bool = False) -> dict[str, int]:
  """Batch mode: reads JSONL prompts, writes JSONL with "completion" in input order.

  Completions are kept on disk as each batch finishes (`completions.py`);
  with `resume`, requests an interrupted run answered are not sampled again.
  """
  requests, bad = _read_requests(input_path, tok, model.config, chat, defaults)
  out = completions.CompletionFile(output_path, [r.record for r in requests], resume)
  todo = [r for r in requests if not out.finished(r.index)]
  with tqdm.tqdm(total=len(todo), desc="sampling", unit="prompt") as bar:
    for b, batch in enumerate(_batches(todo, batch_size)):
      for req, text in zip(batch, generate_batch(model, tok, batch, batch_size, b)):
        out.add(req.index, {**req.record, "completion": text})
      out.sync()
      bar.update(len(batch))
  return {"written": out.close(), "bad_lines": bad, "resumed": len(requests) - len(todo)}


@errors.report_errors("python -m llada_jax.sample")
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llada_jax.sample",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  settings_lib.add_model_flags(parser)
  parser.add_argument("--prompt", help="one prompt; the completion goes to stdout")
  parser.add_argument("--chat", action="store_true", help="apply the chat template")
  parser.add_argument("--input", help="JSONL file of prompts (batch mode)")
  parser.add_argument("--output", help="JSONL file to write (batch mode)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--resume", action="store_true",
                      help="batch mode: keep the completions an interrupted run wrote")
  parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")
  settings_lib.add_sampler_flags(parser)
  args = parser.parse_args(argv)

  # Every check that needs no model comes before loading it.
  if (args.prompt is None) == (args.input is None):
    parser.error("give exactly one of --prompt or --input")
  if args.input is not None:
    if not args.output:
      parser.error("--input needs --output")
    if not paths.isfile(args.input):
      parser.error(f"--input: {args.input} is not a file")
    try:
      completions.check_output(args.output, args.resume)
    except ValueError as e:
      parser.error(str(e))
  if args.batch_size < 1:
    parser.error(f"--batch_size: expected a positive integer, got {args.batch_size}")
  try:
    checkpoint, tokenizer = settings_lib.model_paths(args.checkpoint, args.tokenizer)
    cfg = layout.read_config(checkpoint)  # no weights yet
    defaults = settings_lib.with_family_defaults(settings_lib.sampler_settings(args), cfg.family)
    settings_lib.check_settings(defaults, cfg)
    tok = load_tokenizer(tokenizer)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))

  import llada_jax  # pylint: disable=g-import-not-at-top
  model = llada_jax.load(checkpoint, dtype=args.dtype)
  if args.input is not None:
    stats = run_file(model, tok, args.input, args.output, batch_size=args.batch_size,
                     chat=args.chat, defaults=defaults, resume=args.resume)
    print(f"wrote {stats['written']} completions to {args.output}"
          + (f" ({stats['resumed']} from the interrupted run)" if stats["resumed"] else "")
          + (f"; skipped {stats['bad_lines']} bad line(s)" if stats["bad_lines"] else ""),
          file=sys.stderr)
    return 0
  try:
    ids = encode_request(tok, {"prompt": args.prompt}, args.chat)
    settings_lib.check_settings(defaults, model.config, len(ids))
  except ValueError as e:
    parser.error(str(e))
  seed = defaults.pop("seed")
  out = sampling.generate(model, np.asarray(ids), rng=jax.random.key(seed), **defaults)
  print(tok.decode(np.asarray(out)[len(ids):]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
