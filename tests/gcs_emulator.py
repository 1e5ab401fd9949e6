"""Test helper: a GCS emulator (gcp-storage-emulator) on a free loopback port.

`emulator()` starts it in a subprocess and points every GCS client at it:
gcsfs / google-cloud-storage (`STORAGE_EMULATOR_HOST`), tensorstore's GCS
driver, which Orbax writes through (`TENSORSTORE_GCS_HTTP_URL`, with a fixed
token: `GOOGLE_AUTH_TOKEN_FOR_TESTING`), and turns off gcsfs's bucket-layout
probe (a control-plane API no emulator has). The emulator keeps objects in
memory and creates `BUCKET`; it does not enforce `ifGenerationMatch`
preconditions, so exclusive creation (the workdir lock) is not tested here.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "llada-test"

_SERVE = ("import sys, time\n"
          "from gcp_storage_emulator.server import create_server\n"
          "create_server('127.0.0.1', int(sys.argv[1]), in_memory=True,"
          " default_bucket=sys.argv[2]).start()\n"
          "time.sleep(10**6)\n")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """The environment that sends gcsfs, google-cloud-storage and tensorstore to `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def emulator(log_path: str):
  """Runs the emulator; yields its URL with `client_env(url)` set in os.environ."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(port), BUCKET],
                            stdout=log, stderr=subprocess.STDOUT)
  saved = {k: os.environ.get(k) for k in client_env(url)}
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).close()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"GCS emulator did not start; see {log_path}") from None
        time.sleep(0.1)
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
