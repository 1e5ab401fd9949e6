"""One tokenizer interface for every front end: HF `tokenizer.json` or SentencePiece.

`load_tokenizer(dir_or_file)` returns a `Tokenizer` with `encode`, `decode`,
`apply_chat_template` (SPEC §2 for LLaDA; LLaDA2's own markup, `LLADA2_CHAT`,
keyed by model family), `vocab_size` and the special ids `bos_id eos_id pad_id
mask_id eot_id start_header_id end_header_id` (None if absent).

`python -m llada_jax.tokenizer train --input FILES --vocab_size N --output DIR`
trains a SentencePiece BPE model that reserves LLaDA's special tokens at fixed
ids (`RESERVED`, used by configs/tiny.py) and writes `tokenizer.model` and
`tokenizer_config.json` (ids and the chat template) into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

from llada_jax import paths
from llada_jax.config import SPECIAL_TOKENS

# Fixed ids of a SentencePiece model trained here. EOS is also the padding id.
RESERVED = (
    (0, "<unk>"),
    (1, SPECIAL_TOKENS["bos_token_id"]),
    (2, SPECIAL_TOKENS["eos_token_id"]),
    (3, SPECIAL_TOKENS["mask_token_id"]),
    (4, SPECIAL_TOKENS["start_header_token_id"]),
    (5, SPECIAL_TOKENS["end_header_token_id"]),
    (6, SPECIAL_TOKENS["eot_token_id"]),
)
# LLaDA-Instruct's chat template (SPEC §2), in HF's jinja form for tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")

# LLaDA2.x's chat markup (the Ling 2.0 tokenizer of inclusionAI/LLaDA2.0-*, LLaDA2.1-*).
# Its tokenizer_config.json template opens with a system turn that sets the thinking
# mode, `<role>SYSTEM</role>[system prompt + "\n"]detailed thinking off<|role_end|>`,
# then one `<role>ROLE</role>{content}<|role_end|>` per message (ROLE: SYSTEM, HUMAN,
# ASSISTANT; content as is) and `<role>ASSISTANT</role>` for the model's turn. No BOS.
# (Tools and the multi-step tool-response handling of that template are not rendered.)
LLADA2_CHAT = {"roles": {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"},
               "turn": "<role>{role}</role>{content}<|role_end|>", "thinking": "off",
               "tokens": ("<role>", "</role>", "<|role_end|>")}
# Which markup each model family's tokenizer takes (default: LLaDA's, SPEC §2).
CHAT_FORMATS = {"llada": "llada", "llada_moe": "llada", "llada2": "llada2"}


def render_llada2_chat(messages: Sequence[dict], add_generation_prompt: bool = True,
                       thinking: str = LLADA2_CHAT["thinking"], continuation: bool = False) -> str:
  """LLaDA2's chat template as text (see `LLADA2_CHAT`); `continuation`: the turns
  only, without the opening system turn (to extend a rendered conversation)."""
  _check_messages(messages, LLADA2_CHAT["roles"])
  head, turn = "", LLADA2_CHAT["turn"]
  if messages and messages[0]["role"] == "system" and not continuation:
    head, messages = str(messages[0]["content"]) + "\n", messages[1:]
  out = "" if continuation else f"<role>SYSTEM</role>{head}detailed thinking {thinking}<|role_end|>"
  for message in messages:
    out += turn.format(role=LLADA2_CHAT["roles"][message["role"]],
                       content=str(message["content"]))
  return out + ("<role>ASSISTANT</role>" if add_generation_prompt else "")


def _check_messages(messages: Sequence[dict], roles=None) -> None:
  for n, message in enumerate(messages):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
      raise ValueError(f"messages[{n}]: expected a dict with 'role' and 'content', "
                       f"got {message!r}")
    if roles is not None and message["role"] not in roles:
      raise ValueError(f"messages[{n}]: role {message['role']!r} is not one of "
                       f"{sorted(roles)}")


_ID_FIELDS = {  # attribute -> special token string
    "bos_id": SPECIAL_TOKENS["bos_token_id"],
    "eos_id": SPECIAL_TOKENS["eos_token_id"],
    "mask_id": SPECIAL_TOKENS["mask_token_id"],
    "eot_id": SPECIAL_TOKENS["eot_token_id"],
    "start_header_id": SPECIAL_TOKENS["start_header_token_id"],
    "end_header_id": SPECIAL_TOKENS["end_header_token_id"],
}


class Tokenizer:
  """Common interface; subclasses provide `_encode`, `_decode`, `_token_id`, `vocab_size`."""

  vocab_size: int

  def _init_ids(self, pad_token: str | None = None) -> None:
    for attr, text in _ID_FIELDS.items():
      setattr(self, attr, self._token_id(text))
    self.pad_id = self._token_id(pad_token) if pad_token else None
    if self.pad_id is None:
      self.pad_id = self.eos_id  # LLaDA pads with EOS
    # A tokenizer with LLaDA2's role tokens takes its chat markup unless told otherwise.
    llada2_ids = [self._token_id(t) for t in LLADA2_CHAT["tokens"]]
    self.chat_format = "llada2" if None not in llada2_ids else "llada"
    self.special_ids = frozenset(
        i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id, self.eot_id,
                    self.start_header_id, self.end_header_id, *llada2_ids) if i is not None)

  def encode(self, text: str) -> list[int]:
    """Text -> ids; special-token strings in `text` become their ids; no BOS added."""
    return self._encode(text)

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Ids -> text. Ids outside the vocabulary (a model's spare logit columns) are dropped."""
    ids = [int(i) for i in ids]
    ids = [i for i in ids if 0 <= i < self.vocab_size]
    if skip_special:
      ids = [i for i in ids if i not in self.special_ids]
    return self._decode(ids, skip_special)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          family: str | None = None, continuation: bool = False) -> list[int]:
    """The chat markup of model `family` (`CHAT_FORMATS`; None: the tokenizer's own,
    `chat_format`). LLaDA (SPEC §2): BOS, then per message
    `<sh>role<eh>\\n\\n{content.strip()}<eot>`, then the assistant header when
    `add_generation_prompt` (the model's turn). LLaDA2: `render_llada2_chat`.
    `continuation`: the ids that extend an earlier conversation's (no BOS / no
    LLaDA2 system turn)."""
    if family is not None and family not in CHAT_FORMATS:
      raise ValueError(f"apply_chat_template: family {family!r} is not one of "
                       f"{sorted(CHAT_FORMATS)}")
    if (CHAT_FORMATS[family] if family else self.chat_format) == "llada2":
      return self.encode(render_llada2_chat(messages, add_generation_prompt,
                                            continuation=continuation))
    missing = [n for n, v in (("bos", self.bos_id), ("start_header", self.start_header_id),
                              ("end_header", self.end_header_id), ("eot", self.eot_id))
               if v is None]
    if missing:
      raise ValueError(f"apply_chat_template: the tokenizer has no {', '.join(missing)} token")
    _check_messages(messages)
    ids = [] if continuation else [self.bos_id]
    for message in messages:
      ids += self._header(message["role"], str(message["content"]).strip()) + [self.eot_id]
    if add_generation_prompt:
      ids += self._header("assistant", "")
    return ids

  def _header(self, role: str, text: str) -> list[int]:
    # Text between special tokens is tokenized on its own (as HF does on the rendered
    # template), so building the ids piecewise gives the same ids.
    return ([self.start_header_id] + self.encode(role) + [self.end_header_id]
            + self.encode("\n\n" + text))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class HFTokenizer(Tokenizer):
  """An HF `tokenizers` `tokenizer.json` (LLaDA's released byte-level BPE)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _HFTokenizer  # pylint: disable=g-import-not-at-top
    self.path = path
    self._tok = _HFTokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self._init_ids(_pad_token_from_config(os.path.dirname(path)))

  def _token_id(self, text):
    return self._tok.token_to_id(text)

  def _encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids, skip_special):
    return self._tok.decode(ids, skip_special_tokens=skip_special)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `tokenizer.model` (e.g. one trained by `train` below)."""

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    self._init_ids(_pad_token_from_config(os.path.dirname(path)))

  def _token_id(self, text):
    i = self._sp.piece_to_id(text)
    return i if self._sp.id_to_piece(i) == text else None

  def _encode(self, text):
    return list(self._sp.encode(text))

  def _decode(self, ids, skip_special):
    if skip_special:
      return self._sp.decode(ids)
    # SentencePiece drops control symbols (BOS/EOS) when decoding: write them out.
    out, run = [], []
    for i in ids + [None]:
      if i is None or self._sp.is_control(i):
        out.append(self._sp.decode(run))
        run = []
        if i is not None:
          out.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    return "".join(out)


def _pad_token_from_config(directory: str) -> str | None:
  path = os.path.join(directory, "tokenizer_config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    pad = json.load(f).get("pad_token")
  return pad.get("content") if isinstance(pad, dict) else pad


# The files a tokenizer is read from (copied to a local temp directory from a URL).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str) -> Tokenizer:
  """A model/tokenizer directory (tokenizer.json preferred, else tokenizer.model) or
  either file; a URL (gs://...) too."""
  if paths.is_remote(path):
    if not paths.exists(path):
      raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    directory, name = (path, None) if paths.isdir(path) else os.path.split(path)
    with paths.local_copy(directory, TOKENIZER_FILES) as local:
      tok = load_tokenizer(local if name is None else os.path.join(local, name))
    tok.path = os.path.join(directory, os.path.basename(tok.path))  # its source, not the copy
    return tok
  if os.path.isdir(path):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      if os.path.exists(os.path.join(path, name)):
        return cls(os.path.join(path, name))
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in the directory")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"{path}: not a tokenizer.json (HF tokenizers) or .model (SentencePiece) file")


# ---- training ---------------------------------------------------------------

def _lines(paths: Sequence[str]) -> Iterator[str]:
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.rstrip("\n")
        if line.strip():
          yield line


def train(inputs: Sequence[str], vocab_size: int, output_dir: str,
          max_sentences: int = 2_000_000) -> Tokenizer:
  """Trains a byte-fallback SentencePiece BPE on text files; returns the loaded tokenizer.

  Text round-trips exactly (identity normalisation, whitespace kept, unknown
  characters as bytes); ids 0..6 are `RESERVED`. The vocabulary may come out
  smaller than `vocab_size` on a small corpus.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  inputs = list(inputs)
  if not inputs:
    raise ValueError("--input: no input files given")
  for path in inputs:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--input: {path} is not a file")
  min_size = len(RESERVED) + 256 + 1  # + 256 byte-fallback pieces
  if vocab_size < min_size:
    raise ValueError(f"--vocab_size: {vocab_size} is too small; at least {min_size} "
                     f"(reserved tokens + 256 byte pieces + 1)")
  os.makedirs(output_dir, exist_ok=True)
  by_id = dict(RESERVED)
  model_path = os.path.join(output_dir, "tokenizer.model")
  spm.set_random_generator_seed(0)  # the sentence sample and shuffle: the same every run
  with open(model_path + ".tmp", "wb") as model_file:
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_lines(inputs), model_writer=model_file, model_type="bpe",
          vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
          byte_fallback=True, normalization_rule_name="identity",
          remove_extra_whitespaces=False, add_dummy_prefix=False,
          allow_whitespace_only_pieces=True, split_digits=True,
          unk_id=0, unk_piece=by_id[0], bos_id=1, bos_piece=by_id[1],
          eos_id=2, eos_piece=by_id[2], pad_id=-1,
          user_defined_symbols=[by_id[i] for i in range(3, len(RESERVED))],
          input_sentence_size=max_sentences, shuffle_input_sentence=True,
          num_threads=1, minloglevel=2)  # one thread: the same pieces on every machine
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training failed on --input {inputs}: {e}") from e
  os.replace(model_path + ".tmp", model_path)
  tok = SentencePieceTokenizer(model_path)
  for i, text in RESERVED:
    assert tok._sp.id_to_piece(i) == text, (i, text)  # pylint: disable=protected-access
  config = {
      "tokenizer_class": "SentencePiece",
      "bos_token": by_id[1], "eos_token": by_id[2], "pad_token": by_id[2],
      "unk_token": by_id[0], "add_bos_token": False, "add_eos_token": False,
      "chat_template": CHAT_TEMPLATE,
      "added_tokens_decoder": {str(i): {"content": text, "special": True}
                               for i, text in RESERVED},
      "vocab_size": tok.vocab_size,
  }
  with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return tok


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m llada_jax.tokenizer",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train a SentencePiece tokenizer with LLaDA's special ids")
  p.add_argument("--input", nargs="+", required=True,
                 help="text files (one or more, or comma-separated)")
  p.add_argument("--vocab_size", type=int, required=True)
  p.add_argument("--output", required=True, help="directory for tokenizer.model + config")
  p.add_argument("--max_sentences", type=int, default=2_000_000,
                 help="lines sampled from the input for training")
  args = parser.parse_args(argv)
  inputs = [x for arg in args.input for x in arg.split(",") if x]
  try:
    tok = train(inputs, args.vocab_size, args.output, args.max_sentences)
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"wrote {os.path.join(args.output, 'tokenizer.model')}: {tok.vocab_size} pieces")


if __name__ == "__main__":
  main(sys.argv[1:])
