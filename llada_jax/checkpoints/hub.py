"""Hugging Face Hub ids wherever a model directory is taken.

`resolve_model_dir("GSAI-ML/LLaDA-8B-Instruct")` -> the local snapshot
directory (downloaded once into the Hub cache, then reused). A string that is
an existing directory or a URL (`gs://...`, read in place) is returned as it
is; one that is not, and looks like `owner/name` (optionally
`owner/name@revision`: a branch, tag or commit), is a Hub id. The environment is read at each call, as huggingface_hub documents it:
the cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` allows only what the cache
holds; `HF_TOKEN` (or a `huggingface-cli login`) reaches gated models.
"""

from __future__ import annotations

import os
import re

from llada_jax import paths

# owner/name[@revision], the Hub's repo id characters (a path like ./x or /x is not one).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
                     r"(?:@(?P<revision>\S+))?")
# Weight formats no loader here reads: not downloaded.
IGNORE_PATTERNS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.gguf", "*.tflite")
_TRUE = ("1", "ON", "YES", "TRUE")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
  """'owner/name[@revision]' -> (repo id, revision or None); None if it is not one."""
  m = _HUB_ID.fullmatch(text)
  if m is None or ".." in m["repo"] or "--" in m["repo"]:
    return None
  return m["repo"], m["revision"]


def cache_dir() -> str:
  """The Hub cache directory huggingface_hub uses, from the environment now."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
  return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve_model_dir(path_or_id: str, revision: str | None = None) -> str:
  """A model directory (or URL), or a Hub id `owner/name[@revision]` -> a local directory.

  Args:
    path_or_id: an existing directory (returned unchanged), else a Hub id.
    revision: branch, tag or commit of a Hub id (instead of `@revision`).
  Raises:
    FileNotFoundError: neither an existing directory nor a Hub id; a Hub id
      (with `HF_HUB_OFFLINE` or no network) not in the cache; no such model or
      revision on the Hub. The message names the id and the cache.
    ValueError: a revision given twice, or for a local directory.
  """
  path_or_id = os.fspath(path_or_id)
  if paths.is_remote(path_or_id) or os.path.isdir(path_or_id):  # gs://... is read in place
    if revision is not None:
      what = "URL" if paths.is_remote(path_or_id) else "local directory"
      raise ValueError(f"revision={revision!r}: {path_or_id} is a {what}, not a Hub id")
    return path_or_id
  parsed = parse_hub_id(path_or_id)
  if parsed is None:
    raise FileNotFoundError(f"{path_or_id} is not a directory, nor a Hugging Face Hub id "
                            f"(owner/name[@revision])")
  repo_id, at_revision = parsed
  if at_revision is not None and revision is not None and at_revision != revision:
    raise ValueError(f"{path_or_id}: revision {at_revision!r} differs from "
                     f"revision={revision!r}")
  revision = revision or at_revision
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  cache, no_network = cache_dir(), offline()
  where = (f"the Hub cache {cache} (HF_HOME={os.environ.get('HF_HOME', 'unset')}, "
           f"HF_HUB_CACHE={os.environ.get('HF_HUB_CACHE', 'unset')})")
  named = f"{repo_id}" + (f"@{revision}" if revision else "")
  try:
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, cache_dir=cache, local_files_only=no_network,
        ignore_patterns=list(IGNORE_PATTERNS))
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise FileNotFoundError(f"{named} is not a local directory, and the Hugging Face Hub "
                            f"has no such model or revision (or it is gated: set HF_TOKEN)"
                            f": {e}") from e
  except errors.LocalEntryNotFoundError as e:
    why = ("HF_HUB_OFFLINE is set, so nothing is downloaded" if no_network
           else f"the Hub could not be reached ({e})")
    raise FileNotFoundError(f"{named} is not a local directory and not in {where}; {why}. "
                            f"Download it once online, or give its directory.") from e
