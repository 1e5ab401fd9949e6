"""How the command-line programs report failures: one line, naming the thing.

Every entry point (converters, sample, train) runs its work under
`report_errors`: an exception becomes `PROG: error: <first line>` on stderr
and exit status 1, a full disk becomes "no space left on device writing
PATH", Ctrl-C exit status 130. Tracebacks only with `--verbose` or
`LLADA_DEBUG=1`. `quiet_library_logs` silences absl / Orbax log lines that a
user cannot act on (read-only managers, worker-thread tracebacks).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import re
import sys
import traceback
from typing import Iterator

DEBUG_ENV = "LLADA_DEBUG"
# Loggers whose warnings are noise for a user (they stay visible with LLADA_DEBUG=1).
NOISY_LOGGERS = ("absl", "orbax", "jax._src.distributed", "tensorstore")


def debug_enabled(argv: list[str] | None = None) -> bool:
  """True with LLADA_DEBUG=1 in the environment or --verbose among the arguments."""
  argv = sys.argv[1:] if argv is None else argv
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--verbose" in argv


def is_no_space(e: BaseException) -> bool:
  """A full disk, however the library wrapped it (OSError, TensorStore status text)."""
  for err in _chain(e):
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(err) or "RESOURCE_EXHAUSTED: Disk" in str(err):
      return True
  return False


def _chain(e: BaseException) -> Iterator[BaseException]:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _written_path(e: BaseException) -> str | None:
  """The file a failed write names (an OSError's, or TensorStore's `local file "..."`),
  cut at Orbax's temporary suffixes: the checkpoint being written."""
  for err in _chain(e):
    if isinstance(err, OSError) and err.filename:
      return str(err.filename)
    m = re.search(r'local file "([^"]+)"', str(err))
    if m:
      return re.split(r"\.orbax-checkpoint-tmp|\.partial_save", m[1])[0].rstrip("/")
  return None


def one_line(e: BaseException, where: str | None = None) -> str:
  """The first line of an exception's message (at most 500 characters).

  A full disk reads "no space left on device writing PATH" (the file if the
  error names one, else `where`); a bare KeyError or AttributeError reads
  "missing key 'x'".
  """
  if is_no_space(e):
    return f"no space left on device writing {_written_path(e) or where or 'the output'}"
  text = str(e).strip()
  if isinstance(e, (KeyError, AttributeError)) and text.strip("'\"") and " " not in text:
    text = f"missing key {text.strip(chr(34))}"
  first = text.splitlines()[0] if text else type(e).__name__
  return first[:500]


@contextlib.contextmanager
def report_errors(prog: str, suffix: str = "") -> Iterator[None]:
  """Turns an exception into one line on stderr and SystemExit(1) (130 on Ctrl-C).

  `suffix` is appended to the line (e.g. "; OUT left unchanged"). With
  `debug_enabled()` the exception propagates with its traceback.
  """
  try:
    yield
  except KeyboardInterrupt:
    if debug_enabled():
      raise
    print(f"{prog}: interrupted{suffix}", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  except Exception as e:  # pylint: disable=broad-except
    if debug_enabled():
      traceback.print_exc()
    print(f"{prog}: error: {one_line(e)}{suffix}", file=sys.stderr, flush=True)
    del e
    gc.collect()  # failed async writes finalized now, not noisily at interpreter exit
    raise SystemExit(1) from None


def quiet_library_logs() -> None:
  """No absl / Orbax / TensorStore log lines unless debugging.

  Their warnings are about internals (read-only managers) and their errors
  are logged from worker threads with tracebacks before the same exception
  reaches us, and is reported in one line.
  """
  if debug_enabled():
    return
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.CRITICAL)
