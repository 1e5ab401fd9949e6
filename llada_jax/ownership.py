"""Which process owns a file or directory, and whether it still runs.

An owner is {"host", "pid", "start"}: the host name, the process id and the
process's start time (clock ticks after boot, from /proc; 0 where there is no
/proc), so a reused pid is not taken for the original process. Liveness is
known only on the owner's own host; elsewhere it is unknown (None).
"""

from __future__ import annotations

import os
import re
import socket


def _start_ticks(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22; the command name (field 2) may hold spaces, so split after its ")".
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return 0


def this_owner() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "start": _start_ticks(pid)}


def alive(owner: dict) -> bool | None:
  """True / False for an owner on this host; None for another host (unknown)."""
  if owner.get("host") != socket.gethostname():
    return None
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    pass
  start = owner.get("start") or 0
  return not start or _start_ticks(pid) in (0, start)


def tag() -> str:
  """"HOST-PID" for file names (characters outside [A-Za-z0-9_] become "_")."""
  owner = this_owner()
  return f"{re.sub(r'[^A-Za-z0-9_]', '_', owner['host'])}-{owner['pid']}"


def parse_tag(text: str) -> dict | None:
  """The owner in a name made with `tag()` ("HOST-PID-..."), or None."""
  m = re.match(r"^(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)(-|$)", text)
  if not m:
    return None
  host = socket.gethostname()
  same = re.sub(r"[^A-Za-z0-9_]", "_", host) == m["host"]
  return {"host": host if same else m["host"], "pid": int(m["pid"]), "start": 0}
