"""The training workdir: a model directory that is also a resumable run.

  WORKDIR/config.json          ModelConfig.to_hf() (HF LLaDA format)
  WORKDIR/tokenizer.*          the tokenizer files
  WORKDIR/train_config.json    the full training config
  WORKDIR/checkpoints/<step>/  Orbax CheckpointManager steps with items
      params     the float32 parameter pytree (nnx.to_pure_dict(nnx.split(model)[1]))
      opt_state  the optimiser state
      data       each host's grain iterator state (process_<i>-of-<n>.json)
      meta       json: step, lr_scale, skipped steps, rollbacks, tokens seen
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   logs
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from llada_jax import paths
from llada_jax.checkpoints import layout
from llada_jax.config import ModelConfig
from llada_jax.training import resume

ITEMS = layout.WORKDIR_ITEMS


def manager(workdir: str, every_steps: int, keep: int) -> ocp.CheckpointManager:
  """Async CheckpointManager: saves every `every_steps`, keeps the newest `keep`."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                         enable_async_checkpointing=True, create=True)
  return resume.CheckedManager(layout.checkpoint_dir(workdir), options=options,
                               item_names=ITEMS)


class IteratorSnapshot:
  """A grain iterator's state captured now (the async save runs later)."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], iterator,
         meta: dict[str, Any], force: bool = False) -> bool:
  """Starts an async save of `step` (if due or `force`); True if one started."""
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      data=grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator)),
      meta=ocp.args.JsonSave(meta))
  return mngr.save(step, args=args, force=force,
                   custom_metadata=resume.param_digests(state["params"]))


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict[str, Any], iterator
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params/opt_state restored with the shardings in `abstract`, meta); sets `iterator`."""
  args = ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract["params"]),
      opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
      data=grain.checkpoint.CheckpointRestore(iterator),
      meta=ocp.args.JsonRestore())
  out = mngr.restore(step, args=args)
  return {"params": out["params"], "opt_state": out["opt_state"]}, dict(out["meta"])


def write_model_files(workdir: str, model_cfg: ModelConfig, tokenizer_dir: str | None,
                      train_config_json: str) -> None:
  """config.json, tokenizer files and the training config at the top of the workdir."""
  paths.makedirs(workdir)
  paths.write_text(os.path.join(workdir, layout.CONFIG_FILE),
                   json.dumps(model_cfg.to_hf(), indent=2))
  with paths.open(os.path.join(workdir, layout.TRAIN_CONFIG_FILE), "w") as f:
    f.write(train_config_json)
  if tokenizer_dir and paths.absolute(tokenizer_dir) != paths.absolute(workdir):
    layout.copy_tokenizer_files(tokenizer_dir, workdir)
