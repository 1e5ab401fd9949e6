"""One trainer per workdir: `WORKDIR/.lock` holds the owner's host, pid and start time.

`acquire` creates the file atomically (O_EXCL). A lock whose process is gone
(same host, pid not running or reused) is stale and taken over with a
warning; a live one, or one from another host, stops the second trainer with
a message naming the owner and the file. `held` releases it when the run
ends, however it ends (and atexit, should the process exit inside); a
process that already holds it may acquire it again.

A workdir in a bucket (gs://) has the same lock: the file is created with
GCS's `ifGenerationMatch=0` precondition, as atomic as O_EXCL. Liveness is
still known only on the owner's host, so a trainer killed on another VM (a
preempted TPU VM) leaves a lock that stops the next one with the message
above until the file is deleted.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time

from typing import Iterator

from llada_jax import ownership
from llada_jax import paths

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir."""


def _path(workdir: str) -> str:
  return os.path.join(paths.absolute(workdir), LOCK_FILE)


def read(workdir: str) -> dict | None:
  """The owner recorded in the lock file; None if there is none (or it is unreadable)."""
  try:
    with paths.open(_path(workdir)) as f:
      owner = json.load(f)
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) else {}


def _create(path: str, owner: dict) -> bool:
  return paths.create_exclusive(
      path, json.dumps({**owner, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def acquire(workdir: str) -> str:
  """Takes the workdir's lock (see the module docstring); returns the lock file's path."""
  path = _path(workdir)
  me = ownership.this_owner()
  for _ in range(3):  # a stale lock is removed, then created again under O_EXCL
    if _create(path, me):
      atexit.register(release, workdir, me)
      return path
    owner = read(workdir)
    if owner is None:  # removed meanwhile, or being written: try again
      time.sleep(0.05)
      continue
    same = {k: owner.get(k) for k in ("host", "pid")} == {k: me[k] for k in ("host", "pid")}
    if same and owner.get("start") in (me["start"], 0, None):
      return path  # ours already
    state = ownership.alive(owner)
    if state is False or same:
      print(f"warning: {path}: removing the stale lock of pid {owner.get('pid')} on "
            f"{owner.get('host')} (no longer running)", file=sys.stderr)
      _remove_if(path, owner)
      continue
    where = "running" if state else "on another host; if it has stopped, delete the file"
    raise WorkdirLockedError(
        f"--workdir {workdir}: another trainer holds it (pid {owner.get('pid')} on "
        f"{owner.get('host')}, since {owner.get('since', '?')}; {where}: {path})")
  raise WorkdirLockedError(f"--workdir {workdir}: cannot take the lock {path}")


def _remove_if(path: str, owner: dict) -> None:
  """Removes the lock file if it still names `owner` (not one just taken by another)."""
  current = None
  try:
    with paths.open(path) as f:
      current = json.load(f)
  except (OSError, ValueError):
    pass
  if current is None or current == owner:
    try:
      paths.remove(path)
    except FileNotFoundError:
      pass


def release(workdir: str, owner: dict | None = None) -> None:
  """Removes the lock if this process holds it."""
  owner = owner or ownership.this_owner()
  held = read(workdir)
  if held and held.get("host") == owner["host"] and held.get("pid") == owner["pid"]:
    _remove_if(_path(workdir), held)


@contextlib.contextmanager
def held(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock (creating the workdir) for the `with` body."""
  paths.makedirs(workdir)
  if not enabled:  # multi-host: the primary process holds it for all
    yield
    return
  owned_before = (read(workdir) or {}).get("pid") == os.getpid()
  acquire(workdir)
  try:
    yield
  finally:
    if not owned_before:
      release(workdir)
