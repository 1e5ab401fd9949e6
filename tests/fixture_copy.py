"""Test helper: a copy of a fixture checkpoint with its config.json edited."""

import json
import pathlib
import shutil


def copy_with_config(src: pathlib.Path, dst: pathlib.Path, **changes) -> str:
  """Copies `src` to `dst`, setting config.json keys (None deletes one); -> dst."""
  shutil.copytree(src, dst)
  hf = json.loads((dst / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  (dst / "config.json").write_text(json.dumps(hf))
  return str(dst)
