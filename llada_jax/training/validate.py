"""Training config checks, all before any file is written.

`check_config` validates values (types, ranges, the learning-rate schedule
against `total_steps`, the batch against the mesh and the micro-batches) and
`check_workdir` a workdir against the run about to start in it (a resumed
run must have the workdir's model and objective). Each refusal is one
ValueError naming the key, as `config.optimizer.learning_rate=nan: ...`.
`parse_flags` gives `--config.foo=1` the same one-line treatment.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from typing import Any

import jax

from llada_jax import paths
from llada_jax.checkpoints import layout

# Keys of train_config.json a resumed run may not change: they define what the
# checkpoint holds (the model is compared through config.json, key by key).
FROZEN_KEYS = ("kind",)
# Training objectives (`train.OBJECTIVES`): LLaDA's (SPEC §5), block diffusion's, VRPO's.
KINDS = ("pretrain", "sft", "block_pretrain", "block_sft", "vrpo")
WORKDIR_FILES = (layout.CONFIG_FILE, layout.TRAIN_CONFIG_FILE, layout.CHECKPOINTS_DIR,
                 "metrics.jsonl", "tensorboard", "tokenizer.model", "tokenizer.vocab",
                 "tokenizer_corpus.txt", "broken_checkpoints") + layout.TOKENIZER_FILES


def _get(cfg, key: str, default=None):
  node = cfg
  for part in key.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fail(key: str, value: Any, why: str):
  raise ValueError(f"config.{key}={value!r}: {why}")


def _int(cfg, key: str, lo: int | None = None, allowed: tuple = ()) -> int | None:
  value = _get(cfg, key)
  if value is None and key not in _flat_keys(cfg):
    return None
  if value in allowed and _is_int(value):
    return value
  if not _is_int(value):
    _fail(key, value, "expected an integer")
  if lo is not None and value < lo:
    _fail(key, value, f"must be >= {lo}" + (f" (or {allowed[0]})" if allowed else ""))
  return value


def _real(cfg, key: str, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False) -> float | None:
  value = _get(cfg, key)
  if value is None and key not in _flat_keys(cfg):
    return None
  if not _is_real(value):
    _fail(key, value, "expected a number")
  if not math.isfinite(value):
    _fail(key, value, "must be finite")
  if lo is not None and (value < lo or (lo_open and value == lo)):
    _fail(key, value, f"must be {'>' if lo_open else '>='} {lo:g}")
  if hi is not None and (value > hi or (hi_open and value == hi)):
    _fail(key, value, f"must be {'<' if hi_open else '<='} {hi:g}")
  return value


def _flat_keys(cfg, prefix: str = "") -> set[str]:
  out = set()
  for k in cfg.keys():
    v = cfg[k]
    out.add(prefix + k)
    if hasattr(v, "keys") and not isinstance(v, (str, bytes)):
      out |= _flat_keys(v, f"{prefix}{k}.")
  return out


MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(cfg, device_count: int) -> dict[str, int]:
  """{axis: devices} of config.mesh (ICI x DCN sizes, the -1 entry resolved);
  ValueError naming config.mesh."""
  ici = [_int(cfg, f"mesh.{a}", 1, allowed=(-1,)) or 1 for a in MESH_AXES]
  dcn = [_int(cfg, f"mesh.dcn_{a}", 1) or 1 for a in MESH_AXES]
  shape = "config.mesh=(" + ", ".join(
      f"{a}={i}" + (f"x{d} slices" if d > 1 else "") for a, i, d in zip(MESH_AXES, ici, dcn)) + ")"
  if ici.count(-1) > 1:
    raise ValueError(f"{shape}: at most one axis may be -1")
  slices = math.prod(dcn)
  if device_count % slices:
    raise ValueError(f"{shape}: {device_count} devices do not split into {slices} slices")
  per_slice = device_count // slices
  rest = math.prod(s for s in ici if s != -1)
  if -1 in ici:
    if per_slice % rest:
      raise ValueError(f"{shape}: {per_slice} devices do not divide by {rest}")
    ici[ici.index(-1)] = per_slice // rest
  if math.prod(ici) != per_slice:
    raise ValueError(f"{shape} needs {math.prod(ici) * slices} devices, {device_count} are "
                     "available")
  return {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}


def check_config(cfg, process_count: int = 1, device_count: int = 1) -> None:
  """Every value the trainer reads; ValueError naming the first bad key."""
  kind = _get(cfg, "kind")
  if kind not in KINDS:
    _fail("kind", kind, f"is not one of {', '.join(map(repr, KINDS))}")
  _check_objective(cfg, kind)
  total = _int(cfg, "total_steps", 1)
  for key in ("seq_len", "batch_size", "micro_batches", "log_every", "eval_batches",
              "eval_batch_size", "eval_samples", "max_nonfinite_in_a_row",
              "checkpoint.every_steps", "checkpoint.keep"):
    _int(cfg, key, 1)
  for key in ("seed", "eval_every", "max_rollbacks", "samples.num"):
    _int(cfg, key, 0)
  for key in ("samples.prompt_len", "samples.gen_length", "samples.steps"):
    if _get(cfg, "samples.num"):
      _int(cfg, key, 1)
  _int(cfg, "loss_vocab_chunk", 0)
  _real(cfg, "rollback_lr_scale", 0, 1, lo_open=True)
  _real(cfg, "peak_flops", 0)
  if not _get(cfg, "data.eval_source") and not str(_get(cfg, "data.source", "")).startswith(
      "tfds:"):  # the held-out split is a fraction of the training source
    _real(cfg, "data.eval_fraction", 0, 1, lo_open=True, hi_open=True)
  _check_optimizer(cfg, total)
  _check_batch(cfg, process_count, device_count)
  init_from = _get(cfg, "init_from")
  if init_from and not paths.isdir(init_from):
    _fail("init_from", init_from, "is not a directory")
  if kind == "vrpo":
    _check_vrpo(cfg)


def _check_vrpo(cfg) -> None:
  if not _get(cfg, "init_from"):
    _fail("init_from", _get(cfg, "init_from"), "kind='vrpo' fine-tunes a model: set the "
          "policy's starting model (also the reference, unless config.reference_from)")
  reference = _get(cfg, "reference_from")
  if reference and not paths.isdir(reference):
    _fail("reference_from", reference, "is not a directory")
  _int(cfg, "vrpo.n_samples", 1)
  allocation = _get(cfg, "vrpo.allocation")
  if allocation not in ("optimal", "naive"):
    _fail("vrpo.allocation", allocation, "is not 'optimal' (n timesteps, one mask each) or "
          "'naive' (one timestep, n masks)")
  _real(cfg, "vrpo.beta", 0, lo_open=True)


def check_reference(reference_dir: str, policy_hf: dict[str, Any],
                    reference_hf: dict[str, Any]) -> None:
  """Refuses a reference model whose config.json differs from the policy's, naming
  every differing key."""
  diff = _differing(_flatten(policy_hf), _flatten(reference_hf))
  if diff:
    raise ValueError(f"config.reference_from={reference_dir!r}: its model differs from the "
                     f"policy's (policy -> reference) in {'; '.join(diff)[:400]}; the reference "
                     f"must be the policy's architecture with the same special ids")


def _check_objective(cfg, kind: str) -> None:
  """The block-diffusion and CAP settings (`training/block_objectives.py`, `objectives.py`)."""
  block_keys = {"t_min": 0.0, "t_max": 1.0, "complementary_masking": False,
                "embed_noise_std": 0.0, "embed_noise_steps": 0}
  if kind.startswith("block_"):
    length = _int(cfg, "block_length", 1)
    seq_len = _get(cfg, "seq_len")
    if _is_int(seq_len) and seq_len % length:
      _fail("block_length", length, f"does not divide config.seq_len={seq_len}")
    t_min, t_max = _real(cfg, "t_min", 0, 1), _real(cfg, "t_max", 0, 1)
    if t_min is not None and t_max is not None and t_min > t_max:
      _fail("t_min", t_min, f"is above config.t_max={t_max}")
    if not isinstance(_get(cfg, "complementary_masking", False), bool):
      _fail("complementary_masking", _get(cfg, "complementary_masking"), "expected True/False")
    _real(cfg, "embed_noise_std", 0)
    _int(cfg, "embed_noise_steps", 0)
    if _get(cfg, "samples.num") and _is_int(_get(cfg, "samples.gen_length")) and (
        cfg.samples.gen_length % length):
      _fail("samples.gen_length", cfg.samples.gen_length,
            f"is not a multiple of config.block_length={length} (samples decode by blocks)")
  else:
    for key, default in block_keys.items():
      if _get(cfg, key, default) != default:
        _fail(key, _get(cfg, key), f"only the block kinds read it (config.kind={kind!r})")
  cap = _real(cfg, "cap_weight", 0)
  if cap:
    if kind not in ("sft", "block_sft"):
      _fail("cap_weight", cap, f"CAP is an SFT loss: needs config.kind 'sft' or 'block_sft', "
            f"not {kind!r}")
    if _get(cfg, "loss_vocab_chunk"):
      _fail("cap_weight", cap, "the CAP entropy needs the full logits: set "
            "config.loss_vocab_chunk=0")


def _check_optimizer(cfg, total_steps: int) -> None:
  _real(cfg, "optimizer.learning_rate", 0, lo_open=True)
  for key in ("final_learning_rate", "drop_learning_rate", "weight_decay", "clip_norm"):
    if not (key in ("drop_learning_rate", "clip_norm") and _get(cfg, f"optimizer.{key}") is None):
      _real(cfg, f"optimizer.{key}", 0)  # (None: no drop rate / no clipping)
  _real(cfg, "optimizer.b1", 0, 1, hi_open=True)
  _real(cfg, "optimizer.b2", 0, 1, hi_open=True)
  _real(cfg, "optimizer.eps", 0, lo_open=True)
  warmup = _int(cfg, "optimizer.warmup_steps", 0)
  decay = _int(cfg, "optimizer.decay_steps", 0)
  drop = _int(cfg, "optimizer.drop_step", 0, allowed=(-1,))
  if warmup is not None and decay is not None and warmup + decay > total_steps:
    raise ValueError(f"config.optimizer.warmup_steps={warmup} + config.optimizer.decay_steps="
                     f"{decay} exceed config.total_steps={total_steps}; shorten the schedule "
                     f"or train longer")
  if drop is not None and drop >= total_steps:
    _fail("optimizer.drop_step", drop, f"is not before config.total_steps={total_steps} "
          f"(-1 = no drop)")


def _check_batch(cfg, process_count: int, device_count: int) -> None:
  sizes = mesh_shape(cfg, device_count)
  rows = sizes["data"] * sizes["fsdp"] * sizes["expert"]  # the batch's mesh axes
  split = " x ".join(f"{a}={sizes[a]}" for a in ("data", "fsdp", "expert"))
  batch, micro = _get(cfg, "batch_size"), _get(cfg, "micro_batches")
  if batch % (process_count * micro):
    _fail("batch_size", batch, f"does not divide into {process_count} host(s) x {micro} "
          f"micro-batches (config.micro_batches)")
  if (batch // micro) % rows:
    _fail("batch_size", batch, f"{batch // micro} rows per micro-batch do not divide over the "
          f"mesh's batch axes ({split} = {rows}); use a multiple of "
          f"{rows * micro}")
  eval_batch = _get(cfg, "eval_batch_size")
  if eval_batch % process_count or eval_batch % rows:
    _fail("eval_batch_size", eval_batch, f"does not divide over {process_count} host(s) and "
          f"the mesh's batch axes ({split} = {rows})")


# ---- the workdir ---------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _differing(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  return [f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
          for k in keys if old.get(k) != new.get(k)]


def check_workdir(workdir: str) -> None:
  """Refuses a non-empty directory that is no training workdir (a model snapshot,
  a home directory), naming what is in it: the trainer would write over it.

  A workdir has train_config.json or checkpoints/; a run that died before
  writing them leaves only files the trainer writes (WORKDIR_FILES).
  """
  if not paths.isdir(workdir):
    return
  names = sorted(n for n in paths.listdir(workdir) if not n.startswith("."))
  if layout.TRAIN_CONFIG_FILE in names or layout.CHECKPOINTS_DIR in names:
    return
  foreign = [n for n in names if n not in WORKDIR_FILES or n == layout.CONFIG_FILE]
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ValueError(f"--workdir {workdir}: holds {shown}, which is not a training workdir; "
                     f"choose a new or empty directory")


def check_resume(workdir: str, model_hf: dict[str, Any], train_config: dict[str, Any]) -> bool:
  """Whether `workdir` holds checkpoints to resume; refuses a run that differs.

  The run must have the workdir's model (its config.json, key by key) and
  FROZEN_KEYS of its train_config.json; the refusal names every differing
  key. Other changed settings (total_steps, learning rate...) are listed in
  a note. Nothing is written.
  """
  if not layout.step_dirs(os.path.join(workdir, layout.CHECKPOINTS_DIR)):
    return False
  old_model = _read_json(os.path.join(workdir, layout.CONFIG_FILE))
  diff = _differing(_flatten(old_model), _flatten(model_hf))
  if old_model and diff:
    raise ValueError(f"--workdir {workdir}: its model (config.json) differs from this run's "
                     f"in {'; '.join(diff)[:400]}; resume with the workdir's config or "
                     f"start a new workdir")
  old_train = _flatten(_read_json(os.path.join(workdir, layout.TRAIN_CONFIG_FILE)))
  new_train = _flatten(train_config)
  diff = _differing({k: old_train.get(k) for k in FROZEN_KEYS if k in old_train},
                    {k: new_train.get(k) for k in FROZEN_KEYS if k in old_train})
  if diff:
    raise ValueError(f"--workdir {workdir}: this run changes {'; '.join(diff)}, which its "
                     f"checkpoints depend on; start a new workdir")
  changed = [d for d in _differing(old_train, new_train) if not d.startswith("debug_")]
  if old_train and changed and jax.process_index() == 0:
    print(f"note: resuming {workdir} with changed settings: {'; '.join(changed)[:400]}",
          flush=True)
  return True


def _read_json(path: str) -> dict:
  try:
    with paths.open(path) as f:
      out = json.load(f)
  except FileNotFoundError:
    return {}
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  return out if isinstance(out, dict) else {}


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad `--config.key` in one line (exit status 2)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from llada_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags' KeyError/AttributeError)
    if errors.debug_enabled(argv):
      raise
    key = str(e).strip("'\" ")
    names = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    flag = next((n for n in names if key and n.split(".")[-1] == key), "--config")
    why = ("no such key in the config" if isinstance(e, (KeyError, AttributeError))
           else errors.one_line(e))
    print(f"train: error: {flag}: {why}", file=sys.stderr)
    raise SystemExit(2) from None
