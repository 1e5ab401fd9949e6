"""Resuming a workdir safely: the newest intact step, digests, metrics once per step.

`restore_intact` tries the steps newest first. A step that cannot be read
(a lost params / data / meta file), whose parameters differ from the digests
written with them, or that holds non-finite parameters is broken: a warning
names it, the next older one is tried, and once one restores the broken
newer steps are moved to `WORKDIR/broken_checkpoints/` (kept for a post
mortem, out of the manager's way so the same step numbers can be saved
again). `param_digests` gives `save` the digests to record, and
`CheckedManager` surfaces a failed async save at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import traverse_util

from llada_jax import paths
from llada_jax.checkpoints import integrity
from llada_jax.checkpoints import layout

BROKEN_DIR = "broken_checkpoints"


class NoIntactCheckpointError(RuntimeError):
  """Every step of the workdir is broken."""


def raise_failed_save(mngr: ocp.CheckpointManager) -> None:
  """Raises the error of a background save that has failed (never blocks on one
  still running)."""
  ref = getattr(mngr, "_finalize_thread", None)  # Orbax keeps no public flag for this
  failed = ref is not None and ref.map(
      lambda t: t is not None and not t.is_alive() and t.exception is not None)
  if failed:
    mngr.wait_until_finished()  # re-raises the thread's exception
  mngr.check_for_errors()


class CheckedManager(ocp.CheckpointManager):
  """A CheckpointManager whose `should_save` (asked after every step) first
  raises the error of a failed async save: a full disk stops the run at the
  step it happens, not one save later."""

  def should_save(self, step: int) -> bool:
    raise_failed_save(self)
    return super().should_save(step)


def param_digests(params) -> dict[str, dict[str, str]]:
  """custom_metadata for a step: {"param_digests": {param path: digest}} (on device)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  return {integrity.DIGESTS_KEY: {k: d for k, (d, _) in integrity.report(flat).items()}}


def _verify(mngr: ocp.CheckpointManager, step: int, params) -> None:
  step_dir = os.path.join(str(mngr.directory), str(step))
  want = layout.custom_metadata(step_dir).get(integrity.DIGESTS_KEY) or {}
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  integrity.verify(flat, {k: v.dtype for k, v in flat.items()}, want,
                   os.path.join(step_dir, layout.PARAMS_ITEM),
                   hint="the run diverged before this save")


def _warn(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def restore_intact(mngr: ocp.CheckpointManager, restore: Callable[[int], tuple[Any, dict]],
                   newest: int | None = None) -> tuple[int, Any, dict]:
  """(step, restored state, meta) of the newest intact step at or before `newest`.

  restore: step -> (state with "params", meta), e.g. `workdir.restore` bound
  to the abstract state and the data iterator.
  """
  steps = sorted((s for s in mngr.all_steps() if newest is None or s <= newest), reverse=True)
  broken = []
  for step in steps:
    try:
      restored, meta = restore(step)
      _verify(mngr, step, restored["params"])
    except Exception as e:  # pylint: disable=broad-except  (any damage: try an older step)
      step_dir = os.path.join(str(mngr.directory), str(step))
      _warn(f"{step_dir}: broken checkpoint ({str(e).strip().splitlines()[0][:300]}); "
            f"trying an older step")
      broken.append(step)
      continue
    _set_aside(mngr, broken)
    return step, restored, meta
  raise NoIntactCheckpointError(
      f"{mngr.directory}: no intact checkpoint (broken steps: "
      f"{', '.join(map(str, broken)) or 'none'}); move the checkpoints away to start afresh")


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves broken steps to WORKDIR/broken_checkpoints/<step>-<time> and reloads."""
  if not steps:
    return
  if jax.process_index() == 0:
    out = os.path.join(os.path.dirname(str(mngr.directory)), BROKEN_DIR)
    paths.makedirs(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      dst = os.path.join(out, f"{step}-{stamp}")
      paths.move(os.path.join(str(mngr.directory), str(step)), dst)
      _warn(f"moved the broken step {step} to {dst}")
  if jax.process_count() > 1:  # every host reloads after the move
    multihost_utils.sync_global_devices("llada_set_aside_broken_steps")
  mngr.reload()


def trim_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl rows after `step` (written by a run that died after
  its last checkpoint), so each step appears once after the resume."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not paths.exists(path):
    return
  kept, dropped = [], 0
  with paths.open(path) as f:
    for line in f:
      try:
        row_step = json.loads(line).get("step", 0)
      except (ValueError, AttributeError):
        row_step = None  # a torn last line of a killed run
      if row_step is not None and row_step <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    paths.write_text(path, "".join(kept))
