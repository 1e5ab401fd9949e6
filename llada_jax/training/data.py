"""Input pipelines: documents -> tokens -> fixed-length training rows (grain).

Sources (`source` string):
  "pydoc_data.topics"          Python's bundled documentation, split into paragraphs
  "tfds:NAME[:VERSION]"        a TensorFlow Datasets ArrayRecord source (`tfds` extra)
  PATH or GLOB ending in .txt  plain text, one document per blank-line-separated block
                               (a PATH or GLOB may be a URL: gs://bucket/data/*.jsonl)
  ... .jsonl / .json           one JSON object per line: `text`, or for SFT
                               `prompt`/`response` or chat `messages`, or for
                               preferences (VRPO) `prompt` or `messages` with
                               `chosen`/`rejected` (TRL's preference format)
  ... .array_record            pre-tokenized: each record the int32 ids of a document

Pre-training rows pack documents (ids + EOS) into `seq_len` tokens; SFT rows
are one example each, `<chat prompt>{answer}<eot><EOS>...` right-padded with EOS
(SPEC §5) with the prompt length alongside; preference rows are two SFT rows
of one prompt (`input_ids` the chosen answer, `rejected_ids` the rejected). A
preference line that cannot be used is reported with its number and skipped.
Each host reads its own slice of
the documents; the iterator state (`get_state`/`set_state`) is saved with the
checkpoint, so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from typing import Any, Callable, Sequence

import grain
import numpy as np

from llada_jax import paths

PYDOC = "pydoc_data.topics"


# ---- documents ---------------------------------------------------------------

def _paths(pattern: str) -> list[str]:
  found = paths.glob(pattern)
  if not found:
    raise FileNotFoundError(f"data source {pattern!r}: no file matches")
  return found


def _text_blocks(text: str) -> list[str]:
  return [b.strip() for b in text.split("\n\n") if b.strip()]


def _read_jsonl(path: str, check: Callable[[dict], Any] | None = None) -> list[dict[str, Any]]:
  """The JSON objects of a file, one a line; with `check`, a line it refuses
  (ValueError) is reported on stderr with its number and skipped."""
  rows, skipped = [], 0
  with paths.open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        if check is not None:
          try:
            check(row)
          except ValueError as e:
            print(f"{path}:{n}: skipped: {e}", file=sys.stderr, flush=True)
            skipped += 1
            continue
        rows.append(row)
  if skipped:
    print(f"{path}: skipped {skipped} bad line(s), kept {len(rows)}", file=sys.stderr, flush=True)
  return rows


class _TfdsText:
  """Random access to one field of a `tfds.data_source` (bytes decoded to str)."""

  def __init__(self, source, field: str):
    self._source, self._field = source, field

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    value = self._source[i][self._field]
    return {"text": value.decode("utf-8") if isinstance(value, bytes) else str(value)}


class _TokenRecords:
  """Random access to an ArrayRecord file set of int32 id arrays. ArrayRecord's
  reader opens local files only, so URLs are first copied to a temp directory
  (removed with this object; it needs room for the files)."""

  def __init__(self, files: Sequence[str]):
    self._copies = None
    if any(paths.is_remote(f) for f in files):
      self._copies = tempfile.TemporaryDirectory(prefix="llada_jax-records-")
      files = [_local_copy(f, os.path.join(self._copies.name, f"{i}.array_record"))
               for i, f in enumerate(files)]
    self._source = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return {"ids": np.frombuffer(self._source[i], np.int32)}


def _local_copy(path: str, local: str) -> str:
  """`path` when local, else `local` holding a copy of it."""
  if not paths.is_remote(path):
    return path
  paths.copyfile(path, local)
  return local


def documents(source: str, *, tfds_split: str = "train", data_dir: str | None = None,
              field: str = "text", check: Callable[[dict], Any] | None = None
              ) -> Sequence[dict[str, Any]]:
  """Random-access documents of `source`: dicts with `text`, `ids`, `prompt`/`response`
  or `messages` (+ `chosen`/`rejected`).

  check: validates each JSON line (see `_read_jsonl`); only JSONL sources are
  accepted with it, and at least one line must pass.
  """
  if check is not None:
    return _checked_jsonl(source, check)
  if source == PYDOC:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    return [{"text": b} for key in sorted(topics) for b in _text_blocks(topics[key])]
  if source.startswith("tfds:"):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"data source {source!r} needs tensorflow-datasets: "
                        "pip install 'llada_jax[tfds]'") from None
    return _TfdsText(tfds.data_source(source[5:], split=tfds_split, data_dir=data_dir), field)
  files = _paths(source)
  if all(p.endswith((".array_record", ".arrayrecord")) for p in files):
    return _TokenRecords(files)
  docs: list[dict[str, Any]] = []
  for path in files:
    if path.endswith((".jsonl", ".json")):
      docs.extend(_read_jsonl(path))
    elif path.endswith(".txt"):
      docs.extend({"text": b} for b in _text_blocks(paths.read_text(path)))
    else:
      raise ValueError(f"data source {path!r}: unknown file type "
                       "(want .txt, .jsonl, .json or .array_record)")
  return docs


def _checked_jsonl(source: str, check: Callable[[dict], Any]) -> list[dict[str, Any]]:
  paths = [source] if source == PYDOC or source.startswith("tfds:") else _paths(source)
  docs = []
  for path in paths:
    if not path.endswith((".jsonl", ".json")):
      raise ValueError(f"data source {path!r}: preference data must be JSONL (.jsonl / .json) "
                       "lines with `chosen` and `rejected`")
    docs.extend(_read_jsonl(path, check))
  if not docs:
    raise ValueError(f"data source {source!r}: no usable line (each was reported above)")
  return docs


def write_token_records(path: str, docs_ids: Sequence[Sequence[int]]) -> None:
  """Writes pre-tokenized documents as an ArrayRecord file (one int32 array each)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for ids in docs_ids:
    writer.write(np.asarray(ids, np.int32).tobytes())
  writer.close()


def split_heldout(docs: Sequence[Any], fraction: float, seed: int = 0
                  ) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(train, held-out) documents: a seeded random `fraction` is held out."""
  n = len(docs)
  n_eval = max(1, int(round(n * fraction))) if fraction > 0 else 0
  if n_eval >= n:
    raise ValueError(f"eval fraction {fraction} leaves no training documents of {n}")
  order = np.random.RandomState(seed).permutation(n)
  base = grain.MapDataset.source(docs)
  heldout = set(order[:n_eval].tolist())
  train_idx = [i for i in range(n) if i not in heldout]
  return (grain.MapDataset.range(len(train_idx)).map(lambda i: base[train_idx[i]]),
          grain.MapDataset.range(n_eval).map(lambda i: base[int(order[i])]))


# ---- tokenisation -------------------------------------------------------------

def _text_of(doc: dict[str, Any]) -> str:
  if "text" not in doc:
    raise ValueError(f"document has no 'text' field (keys: {sorted(doc)})")
  return doc["text"]


def pretrain_ids(doc: dict[str, Any], tokenizer, eos_id: int) -> np.ndarray:
  """A document's ids followed by EOS (pre-tokenized records are used as they are)."""
  ids = doc["ids"] if "ids" in doc else tokenizer.encode(_text_of(doc))
  return np.concatenate([np.asarray(ids, np.int32), np.array([eos_id], np.int32)])


def sft_example(doc: dict[str, Any], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """`<chat prompt>{answer}<eot>` right-padded with EOS to `seq_len`, and the prompt length."""
  if "messages" in doc:
    messages = list(doc["messages"])
    if not messages or messages[-1].get("role") != "assistant":
      raise ValueError("SFT example: `messages` must end with an assistant message")
    prompt, answer = messages[:-1], messages[-1]["content"]
  elif "prompt" in doc and "response" in doc:
    prompt, answer = [{"role": "user", "content": doc["prompt"]}], doc["response"]
  else:
    raise ValueError(f"SFT example needs `messages` or `prompt`/`response` (keys: {sorted(doc)})")
  prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
  answer_ids = list(tokenizer.encode(answer.strip()))
  if tokenizer.eot_id is not None:
    answer_ids.append(tokenizer.eot_id)
  prompt_ids = prompt_ids[:seq_len - 1]  # at least one answer position
  ids = (prompt_ids + answer_ids)[:seq_len]
  ids = ids + [tokenizer.eos_id] * (seq_len - len(ids))
  return {"input_ids": np.asarray(ids, np.int32),
          "prompt_len": np.asarray(len(prompt_ids), np.int32)}


def _answer(value: Any, name: str) -> tuple[str, list[dict[str, Any]]]:
  """(answer text, the messages before it): a string, or messages ending with the answer."""
  if isinstance(value, str):
    text, before = value, []
  elif (isinstance(value, list) and value and isinstance(value[-1], dict)
        and value[-1].get("role") == "assistant"):
    text, before = value[-1].get("content"), list(value[:-1])
  else:
    raise ValueError(f"`{name}` must be a string or a list of messages ending with an "
                     "assistant message")
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"`{name}` is an empty answer")
  return text, before


def preference_fields(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
  """(prompt messages, chosen answer, rejected answer) of a preference document.

  Formats (TRL's): `prompt` (a string or messages) or `messages` (the prompt's
  turns), with `chosen` and `rejected` answers (strings or messages ending with
  the assistant's answer); or no prompt field and `chosen`/`rejected` whole
  conversations sharing their turns before the answer. ValueError names what
  is wrong (a missing field, chosen == rejected, ...).
  """
  missing = [k for k in ("chosen", "rejected") if k not in doc]
  if missing:
    raise ValueError(f"preference example has no {' and no '.join(map(repr, missing))} "
                     f"(keys: {sorted(doc)})")
  chosen, chosen_before = _answer(doc["chosen"], "chosen")
  rejected, rejected_before = _answer(doc["rejected"], "rejected")
  if chosen.strip() == rejected.strip():
    raise ValueError("`chosen` and `rejected` are the same answer")
  if chosen_before != rejected_before:
    raise ValueError("`chosen` and `rejected` have different turns before the answer")
  prompt = doc.get("prompt", doc.get("messages", []))
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  prompt = list(prompt) + chosen_before  # (implicit prompt: the conversations' shared turns)
  if not prompt:
    raise ValueError("preference example needs `prompt` or `messages`, or `chosen` and "
                     "`rejected` conversations with the turns before the answer")
  if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
    raise ValueError("the prompt must be a string or a list of {role, content} messages")
  return prompt, chosen, rejected


def preference_example(doc: dict[str, Any], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """The chosen (`input_ids`) and rejected (`rejected_ids`) SFT rows of one prompt,
  and the prompt length (`sft_example` for each answer)."""
  prompt, chosen, rejected = preference_fields(doc)
  rows = [sft_example({"messages": prompt + [{"role": "assistant", "content": answer}]},
                      tokenizer, seq_len) for answer in (chosen, rejected)]
  return {"input_ids": rows[0]["input_ids"], "rejected_ids": rows[1]["input_ids"],
          "prompt_len": rows[0]["prompt_len"]}


# One example per row: kind -> (document, tokenizer, seq_len) -> the row's arrays.
ROW_BUILDERS = {"sft": sft_example, "vrpo": preference_example}


# ---- pipelines ------------------------------------------------------------------

def _pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"input_ids": seq_len})
  return packed.map(lambda row: {"input_ids": row["input_ids"].astype(np.int32)})


def train_dataset(docs: grain.MapDataset, tokenizer, *, kind: str, seq_len: int,
                  batch_size: int, seed: int, eos_id: int,
                  process_index: int = 0, process_count: int = 1,
                  prefetch: int = 0) -> grain.IterDataset:
  """Endless shuffled batches ({"input_ids": [b, L]} (+ "prompt_len": [b], + "rejected_ids":
  [b, L] for preferences)) of one host.

  `batch_size` is this host's share of the global batch. `prefetch` > 0: a
  background thread keeps that many batches ready (tokenising and packing while
  the device trains); the iterator state still counts only the batches taken.
  """
  if len(docs) < process_count:
    raise ValueError(f"{len(docs)} documents cannot be split over {process_count} hosts")
  ds = docs[process_index::process_count].shuffle(seed=seed).repeat(None)
  if kind == "pretrain":
    rows = _pack(ds.map(lambda d: {"input_ids": pretrain_ids(d, tokenizer, eos_id)})
                 .to_iter_dataset(), seq_len)
  elif kind in ROW_BUILDERS:
    rows = ds.map(lambda d: ROW_BUILDERS[kind](d, tokenizer, seq_len)).to_iter_dataset()
  else:
    raise ValueError(f"data kind {kind!r} is not 'pretrain' or one of {sorted(ROW_BUILDERS)}")
  batches = rows.batch(batch_size, drop_remainder=True)
  if prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return batches


def eval_batches(docs: grain.MapDataset, tokenizer, *, kind: str, seq_len: int,
                 batch_size: int, num_batches: int, eos_id: int) -> list[dict[str, np.ndarray]]:
  """A fixed list of held-out batches (the same at every evaluation)."""
  if kind == "pretrain":
    ds = _pack(docs.map(lambda d: {"input_ids": pretrain_ids(d, tokenizer, eos_id)})
               .to_iter_dataset(), seq_len)
  else:
    ds = docs.map(lambda d: ROW_BUILDERS[kind](d, tokenizer, seq_len)).to_iter_dataset()
  batches = []
  for batch in ds.batch(batch_size, drop_remainder=True):
    batches.append(batch)
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError(f"held-out data has fewer than {batch_size} rows of {seq_len} tokens")
  return batches


def unigram_entropy_bits(batches: Sequence[dict[str, np.ndarray]]) -> float:
  """Entropy (bits/token) of the empirical unigram distribution of the scored tokens.

  Scored tokens: all of pre-training rows, the answer part of SFT rows.
  """
  counts: dict[int, int] = {}
  for batch in batches:
    ids_BL = batch["input_ids"]
    keep_BL = np.ones(ids_BL.shape, bool)
    if "prompt_len" in batch:
      keep_BL = np.arange(ids_BL.shape[1])[None] >= batch["prompt_len"][:, None]
    values, n = np.unique(ids_BL[keep_BL], return_counts=True)
    for v, c in zip(values.tolist(), n.tolist()):
      counts[v] = counts.get(v, 0) + c
  total = sum(counts.values())
  return -sum(c / total * math.log2(c / total) for c in counts.values())

