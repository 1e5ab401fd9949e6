"""Local paths and URLs (`gs://bucket/...`, and the other schemes `etils.epath` knows).

Every file the project reads or writes goes through these functions. A local
path takes the plain `os` / `open` route it always took (renames, O_EXCL,
fsync); a URL goes through `etils.epath` (gs:// needs gcsfs: `pip install
'llada_jax[gcs]'`). Object stores differ from a disk where it matters here:

  * no directories: a "directory" is a name prefix; `makedirs` does nothing
    and `isdir` is true once an object lies under it;
  * no rename: `rename_tree` copies every object, then deletes the source;
  * no append: `AppendFile` keeps the lines and rewrites the object on `flush`;
  * writing one object is atomic (readers see the old or the new bytes), so
    `write_text` needs no temp file there;
  * create-if-absent (`create_exclusive`) is GCS's `ifGenerationMatch=0`
    precondition, atomic on the service.

Listings are read fresh on every call (gcsfs would otherwise cache them, and
Orbax / tensorstore write objects behind its back).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

_GLOB_CHARS = "*?["


def is_remote(path) -> bool:
  """Whether `path` is a URL (`scheme://...`) other than file://."""
  path = os.fspath(path)
  return "://" in path and not path.startswith("file://")


def _epath(path):
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # etils comes with orbax-checkpoint
    raise ImportError(f"{path}: URLs need etils[epath]") from e
  p = epath.Path(path)
  fs = getattr(getattr(p, "_backend", None), "fs", None)
  if fs is not None:  # fsspec backend: drop cached listings
    try:
      fs(os.fspath(path)).invalidate_cache()
    except ImportError as e:
      raise ImportError(f"{path}: reading {os.fspath(path).split('://')[0]}:// paths needs "
                        f"gcsfs (pip install 'llada_jax[gcs]')") from e
  return p


def absolute(path) -> str:
  """`os.path.abspath` for a local path; a URL as it is (no trailing slash)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  if is_remote(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path) -> list[str]:
  """Entry names; FileNotFoundError if there is no such directory (or prefix)."""
  if not is_remote(path):
    return os.listdir(path)
  p = _epath(path)
  if not p.is_dir():
    raise FileNotFoundError(f"{path}: no such directory")
  return [c.name for c in p.iterdir()]


def makedirs(path) -> None:
  """Creates a directory and its parents (a no-op on an object store)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def getsize(path) -> int:
  return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern (`~` expanded for local ones)."""
  if not is_remote(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(os.path.expanduser(pattern)))
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  fixed = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)),
               len(parts))
  if fixed == len(parts):
    return [pattern] if exists(pattern) else []
  base = f"{scheme}://" + "/".join(parts[:fixed])
  return sorted(os.fspath(p) for p in _epath(base).glob("/".join(parts[fixed:])))


def open(path, mode: str = "r", encoding: str | None = None) -> IO:  # pylint: disable=redefined-builtin
  """A file object; text modes default to UTF-8 for URLs. No append mode on URLs
  (use `AppendFile`)."""
  if not is_remote(path):
    return io.open(path, mode, encoding=encoding)
  if "a" in mode:
    raise ValueError(f"{path}: object stores cannot append; use paths.AppendFile")
  if "b" in mode:
    return _epath(path).open(mode)
  return _epath(path).open(mode, encoding=encoding or "utf-8")


def read_text(path) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def write_text(path, text: str) -> None:
  """Writes `path` whole: readers see the old or the new text, never a part
  (a temp file and a rename locally; one object upload on a store)."""
  if is_remote(path):
    with open(path, "w") as f:
      f.write(text)
    return
  tmp = f"{path}.tmp"
  with io.open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def create_exclusive(path, text: str) -> bool:
  """Creates `path` holding `text` only if it does not exist; False if it did.

  Locally O_EXCL (+ fsync); on GCS the `ifGenerationMatch=0` precondition.
  """
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return True
  try:
    import fsspec  # pylint: disable=g-import-not-at-top  (epath has no "x" mode)
    fs, where = fsspec.core.url_to_fs(os.fspath(path))
    fs.pipe_file(where, text.encode(), mode="create")  # one upload, ifGenerationMatch=0
  except FileExistsError:
    return False
  except OSError as e:  # gcsfs: HTTP 412 precondition failed
    if "412" in str(e) or "recondition" in str(e):
      return False
    raise
  return True


def remove(path) -> None:
  """Removes a file; FileNotFoundError if there is none."""
  if not is_remote(path):
    os.remove(path)
    return
  p = _epath(path)
  if not p.exists():
    raise FileNotFoundError(f"{path}: no such file")
  p.unlink()


def rmtree(path, ignore_errors: bool = False) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    p = _epath(path)
    if p.exists():
      p.rmtree()
  except OSError:
    if not ignore_errors:
      raise


def copyfile(src, dst) -> None:
  """Copies one file (between local paths and URLs in any direction)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout, 16 << 20)


def walk_files(path) -> list[str]:
  """Paths of all files under a directory, relative to it."""
  if not is_remote(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)
  out = []
  for name in listdir(path):
    full = os.path.join(path, name)
    out += [f"{name}/{sub}" for sub in walk_files(full)] if isdir(full) else [name]
  return sorted(out)


def rename_tree(src, dst, last: tuple[str, ...] = ()) -> None:
  """Moves directory `src` to `dst` (which must not hold files).

  Locally one atomic rename. On an object store each object is copied, then
  the source deleted: not atomic. Files named in `last` (relative paths) are
  copied after all others, so a reader that takes them as the mark of a
  complete directory never sees a partial one.
  """
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  names = walk_files(src)
  ordered = [n for n in names if n not in last] + [n for n in last if n in names]
  for name in ordered:
    copyfile(os.path.join(src, name), os.path.join(dst, name))
  rmtree(src)


def move(src, dst) -> None:
  """`shutil.move` of a file or directory (copy + delete on an object store)."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(src, dst)
  elif isdir(src):
    rename_tree(src, dst)
  else:
    copyfile(src, dst)
    remove(src)


@contextlib.contextmanager
def local_copy(directory, names) -> Iterator[str]:
  """A local directory holding those of `names` that `directory` has (the
  directory itself when local; a temp copy of a URL's files, removed after)."""
  if not is_remote(directory):
    yield os.fspath(directory)
    return
  with tempfile.TemporaryDirectory(prefix="llada_jax-") as tmp:
    for name in names:
      if exists(os.path.join(directory, name)):
        copyfile(os.path.join(directory, name), os.path.join(tmp, name))
    yield tmp


class AppendFile:
  """A text file written by appending lines: `open(path, "a")` locally; on an
  object store the lines so far are kept and the object rewritten at each
  `flush` (and `close`), since objects cannot be appended to."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    if not self.remote:
      self._file = io.open(self.path, "a", encoding="utf-8")
      return
    self._text = io.StringIO()
    if exists(self.path):
      self._text.write(read_text(self.path))
    self._dirty = False

  def write(self, text: str) -> None:
    if self.remote:
      self._text.write(text)
      self._dirty = True
    else:
      self._file.write(text)

  def flush(self, durable: bool = False) -> None:
    """Writes out the lines so far (`durable`: also fsync a local file)."""
    if not self.remote:
      self._file.flush()
      if durable:
        os.fsync(self._file.fileno())
    elif self._dirty:
      write_text(self.path, self._text.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._file.close()
