"""The three kinds of model directory and where things are in them (one owner of the layout).

  HF snapshot   config.json, tokenizer files, safetensors shards (+ index) or
                PyTorch `.bin` files;
  converted     config.json, tokenizer files, `params/` (an Orbax checkpoint of
                the parameter pytree `nnx.to_pure_dict(nnx.split(model)[1])`);
  workdir       config.json, tokenizer files, train_config.json,
                `checkpoints/<step>/{params,opt_state,data,meta}` (an Orbax
                CheckpointManager directory), metrics.jsonl, tensorboard/.

Any of them may lie in a bucket (`gs://...`; file operations: `llada_jax/paths.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from llada_jax import paths
from llada_jax.config import ModelConfig, config_from_model_dir

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"  # converted directory: the Orbax param checkpoint
CHECKPOINTS_DIR = "checkpoints"  # workdir: the CheckpointManager directory
PARAMS_ITEM = "params"  # CheckpointManager item holding the param pytree
# Items of a workdir checkpoint step: params, optimiser state, grain iterator states, json meta.
WORKDIR_ITEMS = (PARAMS_ITEM, "opt_state", "data", "meta")
TRAIN_CONFIG_FILE = "train_config.json"  # workdir: the full training config
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
PYTREE_METADATA = "_METADATA"  # Orbax's pytree metadata file
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-checkpoint json (custom_metadata)
COMMIT_SUCCESS = "commit_success.txt"  # Orbax's mark of a finished step on an object store
# What the converters write into an output directory: the entries a directory
# may hold for `--overwrite` to replace it.
SAFETENSORS_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
OUTPUT_FILES = (CONFIG_FILE, PARAMS_DIR, "model.safetensors.index.json") + TOKENIZER_FILES


def model_dir_kind(path: str) -> str:
  """"hf" | "converted" | "workdir" for a model directory."""
  if paths.isdir(os.path.join(path, PARAMS_DIR)):
    return "converted"
  if paths.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return "workdir"
  return "hf"


def read_config(path: str, **overrides) -> ModelConfig:
  """`config_from_model_dir`, with errors naming the directory's config.json."""
  try:
    return config_from_model_dir(path, **overrides)
  except ValueError as e:
    msg = str(e)
    if msg.startswith(CONFIG_FILE):
      msg = os.path.join(path, msg)
    raise ValueError(msg) from e


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer (and generation config) files `src_dir` has; returns names."""
  copied = []
  for name in TOKENIZER_FILES:
    if paths.exists(os.path.join(src_dir, name)):
      paths.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def write_config(dst_dir: str, cfg: ModelConfig, torch_dtype: str, source_dir: str) -> None:
  """Writes `config.json`: `cfg.to_hf()`, keeping `source_dir`'s values for keys
  that are no ModelConfig field (`_name_or_path`, `init_device`...), so they
  survive a conversion unchanged.
  """
  with paths.open(os.path.join(source_dir, CONFIG_FILE)) as f:
    hf = json.load(f)
  fields = {f.name for f in dataclasses.fields(ModelConfig)} | {"torch_dtype"}
  for key, value in cfg.to_hf(torch_dtype=torch_dtype).items():
    if key in fields or key not in hf:
      hf[key] = value
  with paths.open(os.path.join(dst_dir, CONFIG_FILE), "w") as f:
    json.dump(dict(sorted(hf.items())), f, indent=2)
    f.write("\n")


def foreign_entries(path: str, incomplete_ok: bool = False) -> list[str] | None:
  """None if `path` holds a converted checkpoint or HF snapshot as the converters
  write them; else the entries that are not such a checkpoint (all of them if
  the checkpoint's config.json or weights are missing, unless `incomplete_ok`)."""
  names = sorted(paths.listdir(path))
  foreign = [n for n in names if n not in OUTPUT_FILES and not SAFETENSORS_NAME.match(n)]
  has_weights = PARAMS_DIR in names or any(SAFETENSORS_NAME.match(n) for n in names)
  if foreign or (not incomplete_ok and (CONFIG_FILE not in names or not has_weights)):
    return foreign or names
  return None


def step_dirs(checkpoints_dir: str) -> list[str]:
  """Finalized step directories of a CheckpointManager directory, newest first.

  Orbax writes a step under a temporary name and renames it to the bare step
  number when complete, so the numbered directories are the finished steps;
  on an object store (no rename) it writes in place and marks a finished step
  with COMMIT_SUCCESS.
  """
  try:
    names = paths.listdir(checkpoints_dir)
  except FileNotFoundError:
    return []
  done = ((lambda d: paths.exists(os.path.join(d, COMMIT_SUCCESS)))
          if paths.is_remote(checkpoints_dir) else paths.isdir)
  steps = sorted((int(n) for n in names if n.isdigit()
                  and done(os.path.join(checkpoints_dir, n))), reverse=True)
  return [os.path.join(paths.absolute(checkpoints_dir), str(s)) for s in steps]


def latest_step_dir(checkpoints_dir: str) -> str:
  """The newest complete step directory of a CheckpointManager directory."""
  steps = step_dirs(checkpoints_dir)
  if not steps:
    raise FileNotFoundError(f"{checkpoints_dir}: no complete checkpoint step")
  return steps[0]


def custom_metadata(orbax_dir: str) -> dict:
  """The `custom_metadata` of an Orbax checkpoint directory ({} if it has none)."""
  try:
    with paths.open(os.path.join(orbax_dir, CHECKPOINT_METADATA)) as f:
      out = json.load(f).get("custom_metadata") or {}
  except (OSError, ValueError, AttributeError):
    return {}
  return out if isinstance(out, dict) else {}


def params_pytree_dirs(path: str) -> list[str]:
  """The candidate parameter pytree directories under `path`, best first: a
  workdir's steps newest first, else the one `params_pytree_dir(path)`."""
  path = paths.absolute(path)
  if (not paths.exists(os.path.join(path, PYTREE_METADATA))
      and paths.isdir(os.path.join(path, CHECKPOINTS_DIR))):
    steps = step_dirs(os.path.join(path, CHECKPOINTS_DIR))
    if not steps:
      raise FileNotFoundError(f"{os.path.join(path, CHECKPOINTS_DIR)}: no complete "
                              f"checkpoint step")
    return [os.path.join(s, PARAMS_ITEM) for s in steps]
  return [params_pytree_dir(path)]


def params_pytree_dir(path: str) -> str:
  """The Orbax pytree directory of the parameters under `path`.

  `path` may be a converted or workdir model directory, its `params/`, a
  CheckpointManager step directory, or the pytree directory itself. The result
  is absolute (Orbax refuses relative paths).
  """
  path = paths.absolute(path)
  if paths.exists(os.path.join(path, PYTREE_METADATA)):
    return path
  if paths.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return params_pytree_dir(latest_step_dir(os.path.join(path, CHECKPOINTS_DIR)))
  # converted `params/` (v1 layout: the pytree sits in `state/`) or a step's item.
  for sub in (PARAMS_DIR, "state", "pytree"):
    if paths.isdir(os.path.join(path, sub)):
      return params_pytree_dir(os.path.join(path, sub))
  raise FileNotFoundError(f"{path}: no Orbax parameter checkpoint ({PARAMS_DIR}/ or "
                          f"{CHECKPOINTS_DIR}/ with a complete step)")


def checkpoint_dir(workdir: str) -> str:
  """The CheckpointManager directory of a workdir (absolute: Orbax wants absolute paths)."""
  return os.path.join(paths.absolute(workdir), CHECKPOINTS_DIR)
