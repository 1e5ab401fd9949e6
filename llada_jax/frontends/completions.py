"""Batch-mode output that survives a crash: completions are kept as they finish.

Each finished completion is appended to `OUTPUT.partial` (one JSON line,
flushed and fsynced), so a crash, Ctrl-C or full disk keeps what was done;
`close` then writes OUTPUT in input order (atomically) and removes the
partial file. A rerun with `--resume` reads the partial file (or a complete
OUTPUT) and skips the requests already answered. A request is known by its
input object (and its occurrence, for repeated lines), not its line number,
so a resumed run never pairs a completion with a different prompt.
OUTPUT may be a URL (gs://...): objects cannot be appended to, so there the
partial object is rewritten whole at each `sync` (after each batch).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from llada_jax import paths

PARTIAL_SUFFIX = ".partial"


def request_keys(records: Iterable[dict]) -> list[str]:
  """A key per input object: its digest and how many equal objects came before."""
  seen: dict[str, int] = {}
  keys = []
  for record in records:
    h = hashlib.sha1(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    keys.append(f"{h}:{seen.get(h, 0)}")
    seen[h] = seen.get(h, 0) + 1
  return keys


def check_output(path: str, resume: bool) -> None:
  """Refuses, before any sampling, an output path that cannot be written or
  that would throw away an interrupted run's completions."""
  if paths.isdir(path):
    raise ValueError(f"--output: {path} is a directory; name a .jsonl file")
  parent = os.path.dirname(paths.absolute(path))
  if not paths.is_remote(path) and not os.path.isdir(parent):  # (buckets have no directories)
    raise ValueError(f"--output: directory {parent} does not exist")
  if not paths.is_remote(path) and not os.access(parent, os.W_OK):
    raise ValueError(f"--output: directory {parent} is not writable")
  partial = path + PARTIAL_SUFFIX
  if paths.exists(partial) and not resume:
    raise ValueError(f"--output: {partial} holds the completions of an interrupted run; "
                     f"pass --resume to continue it, or delete it")


def _read_done(path: str) -> dict[str, dict]:
  """{key: output record} from a partial file (torn last line ignored)."""
  done = {}
  with paths.open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
        done[row["key"]] = row["record"]
      except (ValueError, KeyError, TypeError):
        continue  # the line a crash cut short
  return done


class CompletionFile:
  """OUTPUT.partial while running, OUTPUT when closed (see the module docstring)."""

  def __init__(self, path: str, records: list[dict], resume: bool = False):
    check_output(path, resume)
    self.path = path
    self.partial = path + PARTIAL_SUFFIX
    self.keys = request_keys(records)
    self.done: dict[str, dict] = {}
    from_output = False
    if resume and paths.exists(self.partial):
      self.done = _read_done(self.partial)
    elif resume and paths.exists(path):  # a finished run: its lines, by input object
      with paths.open(path, encoding="utf-8") as f:
        finished = [json.loads(line) for line in f if line.strip()]
      bare = [{k: v for k, v in r.items() if k != "completion"} for r in finished]
      self.done, from_output = dict(zip(request_keys(bare), finished)), True
    self._file = paths.AppendFile(self.partial)
    if from_output:  # so that a crash from here on still keeps them
      for key, record in self.done.items():
        self._append(key, record)
      self.sync()

  def _append(self, key: str, record: dict) -> None:
    self._file.write(json.dumps({"key": key, "record": record}, ensure_ascii=False) + "\n")
    if not self._file.remote:
      self._file.flush(durable=True)

  def sync(self) -> None:
    """Puts every completion so far in the partial file (a URL's is rewritten)."""
    self._file.flush(durable=True)

  def finished(self, index: int) -> bool:
    return self.keys[index] in self.done

  def add(self, index: int, record: dict[str, Any]) -> None:
    """Keeps the output record of request `index` (on disk before returning)."""
    self.done[self.keys[index]] = record
    self._append(self.keys[index], record)

  def close(self) -> int:
    """Writes OUTPUT (input order; every request must be done); returns its line count."""
    self._file.close()
    missing = [k for k in self.keys if k not in self.done]
    if missing:
      raise RuntimeError(f"{self.path}: {len(missing)} request(s) have no completion")
    lines = [json.dumps(self.done[key], ensure_ascii=False) + "\n" for key in self.keys]
    if paths.is_remote(self.path):  # one object upload: whole or not at all
      paths.write_text(self.path, "".join(lines))
      paths.remove(self.partial)
      return len(self.keys)
    tmp = self.path + ".tmp"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)  # the partial file still holds every completion
      raise
    os.remove(self.partial)
    return len(self.keys)
