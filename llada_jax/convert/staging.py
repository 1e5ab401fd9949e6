"""What both converters share: an all-or-nothing output directory, progress
with a closing summary, and a command-line wrapper that turns any failure
into one line and a non-zero exit.

The output may be a URL (gs://...). An object store has no rename (and
Orbax's streaming partial saves need one), so there the conversion is
written to a local temp directory (`TMPDIR`: room for the whole output) and
then uploaded file by file (an old checkpoint removed first) with
`config.json` last: a directory without it is no model directory to any
reader, and one the converters wrote, left so by a crash during the upload,
is replaced by a rerun with `--overwrite`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Sequence

import tqdm

from llada_jax import errors
from llada_jax import ownership
from llada_jax import paths
from llada_jax.checkpoints import layout


PARTIAL = "partial"  # .NAME.partial-HOST-PID-XXXX: a conversion being written
OLD = "old"  # .NAME.old-HOST-PID-XXXX: the replaced output, removed after the swap


def _real(path: str) -> str:
  return paths.absolute(path) if paths.is_remote(path) else os.path.realpath(os.path.abspath(path))


def check_output(output_dir: str, overwrite: bool, sources: Sequence[str] = ()) -> None:
  """Refuses, before any work, an output that would lose data.

  The output may not be a source or a directory above one (replacing it
  would delete the input). An existing non-empty output is replaced only
  with `overwrite`, and only if it holds a checkpoint as the converters write
  them (config.json + params/ or safetensors, tokenizer files); otherwise the
  error names what is there.
  """
  out = _real(output_dir)
  for src in sources:
    src_real = _real(src)
    if out == src_real or src_real.startswith(out + os.sep):
      what = "is" if out == src_real else "contains"
      raise ValueError(f"--output_dir {output_dir} {what} the input {src}; choose another "
                       f"output directory")
  if not paths.exists(output_dir):
    return
  if not paths.isdir(output_dir):
    raise FileExistsError(f"{output_dir}: exists and is not a directory")
  if not paths.listdir(output_dir):
    return
  if not overwrite:
    raise FileExistsError(f"{output_dir}: already holds files (a checkpoint?); "
                          f"pass --overwrite to replace it")
  # On an object store, also a copy cut short before its config.json (module docstring).
  foreign = layout.foreign_entries(output_dir, incomplete_ok=paths.is_remote(output_dir))
  if foreign is not None:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise FileExistsError(f"{output_dir}: holds {shown}, which is not a checkpoint written by "
                          f"the converters; --overwrite replaces only such a checkpoint")


def clean_leftovers(output_dir: str) -> list[str]:
  """Removes `.NAME.partial-*` / `.NAME.old-*` beside `output_dir` left by dead
  conversions on this host; returns (and warns about) the ones left in place
  (their owner runs, is on another host, or is unknown)."""
  parent, base = os.path.split(os.path.abspath(output_dir))
  kept = []
  try:
    names = os.listdir(parent)
  except FileNotFoundError:
    return kept
  for name in names:
    for kind in (PARTIAL, OLD):
      prefix = f".{base}.{kind}-"
      if name.startswith(prefix):
        owner = ownership.parse_tag(name[len(prefix):])
        if owner is not None and ownership.alive(owner) is False:
          shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        else:
          kept.append(os.path.join(parent, name))
  for path in kept:
    print(f"warning: {path}: left by another conversion into {output_dir} (running, on "
          f"another host, or from an older version); remove it if none is running",
          file=sys.stderr)
  return kept


@contextlib.contextmanager
def staged_output(output_dir: str, overwrite: bool = False,
                  sources: Sequence[str] = ()) -> Iterator[str]:
  """Yields a fresh temp directory beside `output_dir`; on success renames it there.

  Refuses (before any work, see `check_output`) an output that is or holds
  an input, or a non-empty `output_dir` unless `overwrite` and it is one of
  our checkpoints. On any failure or interrupt the temp directory is removed,
  so `output_dir` is left as it was: absent, empty, or (with `overwrite`) the
  old checkpoint. Temp directories of killed conversions are removed first.
  A URL output is staged in a local temp directory and uploaded (module docstring).
  """
  check_output(output_dir, overwrite, sources)
  if paths.is_remote(output_dir):
    with _staged_remote(paths.absolute(output_dir), overwrite, sources) as tmp:
      yield tmp
    return
  output_dir = os.path.abspath(output_dir)
  parent, base = os.path.split(output_dir)
  os.makedirs(parent, exist_ok=True)
  clean_leftovers(output_dir)
  owner = ownership.tag()
  tmp = tempfile.mkdtemp(prefix=f".{base}.{PARTIAL}-{owner}-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a checkpoint needs
  try:
    yield tmp
    if os.path.exists(output_dir) and os.listdir(output_dir):
      check_output(output_dir, overwrite, sources)  # nothing new arrived meanwhile
      old = tempfile.mkdtemp(prefix=f".{base}.{OLD}-{owner}-", dir=parent)
      os.rename(output_dir, os.path.join(old, base))
      os.rename(tmp, output_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:  # absent, or an empty directory (which rename replaces)
      os.rename(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def _staged_remote(output_dir: str, overwrite: bool, sources: Sequence[str]) -> Iterator[str]:
  """`staged_output` for a URL: a local temp directory, uploaded into place."""
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.{PARTIAL}-")
  try:
    yield tmp
    if paths.isdir(output_dir) and paths.listdir(output_dir):
      check_output(output_dir, overwrite, sources)  # nothing new arrived meanwhile
      paths.rmtree(output_dir)
    paths.rename_tree(tmp, output_dir, last=(layout.CONFIG_FILE,))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_bytes(pid: int | str = "self") -> int:
  """Peak resident set size of a process (VmHWM, which exec resets; getrusage's
  ru_maxrss would include the parent's RSS at fork)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:  # no /proc, or the process has exited
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == "self" else 0


def release_freed_memory() -> None:
  """Returns freed heap memory to the OS (glibc keeps large freed buffers of
  worker threads in its arenas, which would otherwise add up across tensors)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def write_tensors(writer, bar: "Progress", named_arrays: Iterable[tuple[str, Any]],
                  nbytes: Callable[[Any], int], tensors: Callable[[str], int]) -> dict:
  """Writes each (name, array) with `writer` (freeing memory between tensors), closes
  it, -> `bar`'s summary; `nbytes` / `tensors` say what one array adds to the bar."""
  for name, array in named_arrays:
    writer.write(name, array)
    bar.update(nbytes(array), tensors(name), array.size)
    del array
    release_freed_memory()
  writer.close()
  return bar.close()


class Progress:
  """A tqdm bar over bytes with a tensor count, and the closing summary."""

  def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool = True):
    self.total_tensors = total_tensors
    self.tensors = 0
    self.params = 0
    self.nbytes = 0
    self.start = time.perf_counter()
    self.bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=desc, disable=not enabled, file=sys.stderr)

  def update(self, nbytes: int, tensors: int, params: int) -> None:
    self.tensors += tensors
    self.params += params
    self.nbytes += nbytes
    self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
    self.bar.update(nbytes)

  def close(self) -> dict:
    self.bar.close()
    return {"params": self.params, "tensors": self.tensors, "bytes": self.nbytes,
            "seconds": round(time.perf_counter() - self.start, 3),
            "peak_rss_bytes": peak_rss_bytes()}


def summary_line(what: str, s: dict) -> str:
  return (f"{what}: {s['params']:,} parameters in {s['tensors']} tensors, "
          f"{s['bytes'] / 2**30:.3f} GiB in {s['seconds']:.1f} s, "
          f"peak RSS {s['peak_rss_bytes'] / 2**30:.3f} GiB")


def add_common_flags(parser, dtypes: Sequence[str], source: str, output: str) -> None:
  """The converters' shared flags: --dtype (of `dtypes`; default: the `source`'s),
  --overwrite (an `output` in --output_dir), --allow_nonfinite, --no_progress, --verbose."""
  parser.add_argument("--dtype", choices=sorted(dtypes), default=None,
                      help=f"tensor dtype on disk (default: the {source}'s)")
  parser.add_argument("--overwrite", action="store_true",
                      help=f"replace a {output} already in --output_dir")
  parser.add_argument("--allow_nonfinite", action="store_true",
                      help="convert tensors holding NaN / Inf (for debugging)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--verbose", action="store_true", help="tracebacks on errors")


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def run_cli(prog: str, output_dir: str, fn: Callable[[], str]) -> int:
  """Runs `fn` (returns the summary line); failures -> one line on stderr, exit 1.

  SIGTERM is turned into an interrupt so the staged output is cleaned up.
  Library log lines are silenced (`errors.quiet_library_logs`).
  """
  errors.quiet_library_logs()
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    print(fn())
    return 0
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; {output_dir} left unchanged", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if errors.debug_enabled():
      traceback.print_exc()
    where = os.path.dirname(paths.absolute(output_dir))
    print(f"{prog}: error: {errors.one_line(e, where)}; {output_dir} left unchanged",
          file=sys.stderr)
    return 1
  finally:
    signal.signal(signal.SIGTERM, previous)
