"""What both converters share: an all-or-nothing output directory, progress
with a closing summary, and a command-line wrapper that turns any failure
into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable, Iterator

import tqdm


@contextlib.contextmanager
def staged_output(output_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temp directory beside `output_dir`; on success renames it there.

  Refuses (before any work) a non-empty `output_dir` unless `overwrite`. On
  any failure or interrupt the temp directory is removed, so `output_dir` is
  left as it was: absent, empty, or (with `overwrite`) the old checkpoint.
  """
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir):
    if not os.path.isdir(output_dir):
      raise FileExistsError(f"{output_dir}: exists and is not a directory")
    if os.listdir(output_dir) and not overwrite:
      raise FileExistsError(f"{output_dir}: already holds files (a checkpoint?); "
                            f"pass --overwrite to replace it")
  parent, base = os.path.split(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is not what a checkpoint needs
  try:
    yield tmp
    if os.path.exists(output_dir) and os.listdir(output_dir):
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(output_dir, os.path.join(old, base))
      os.rename(tmp, output_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:  # absent, or an empty directory (which rename replaces)
      os.rename(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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


def _one_line(e: BaseException, output_dir: str) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  no_space = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
      "No space left on device" in str(e))
  if no_space:
    where = getattr(e, "filename", None) or os.path.dirname(os.path.abspath(output_dir))
    text = f"no space left on device writing {where}"
  return text[:500]


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def run_cli(prog: str, output_dir: str, fn: Callable[[], str]) -> int:
  """Runs `fn` (returns the summary line); failures -> one line on stderr, exit 1.

  SIGTERM is turned into an interrupt so the staged output is cleaned up.
  """
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    print(fn())
    return 0
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; {output_dir} left unchanged", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    print(f"{prog}: error: {_one_line(e, output_dir)}; {output_dir} left unchanged", file=sys.stderr)
    return 1
  finally:
    signal.signal(signal.SIGTERM, previous)
