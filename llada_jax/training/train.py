"""Masked-diffusion pre-training and SFT of LLaDA, sharded, preemption-safe.

  python -m llada_jax.train --config configs/tiny.py --workdir runs/tiny [--config.key=value]

The same program runs on a laptop and on every host of a TPU slice. Data flows
one way: data (host slices) -> global batch -> `train_step` (noise, loss,
gradient, AdamW) -> checkpoint. The host stays a step ahead of the devices:
it makes the next batch and dispatches the next step before it reads the last
one's metrics (one scalar, all of them at log steps: metrics.jsonl rows). The
workdir is itself a model directory: `config.json` + tokenizer files at the top
and `checkpoints/` (Orbax steps with items `params`, `opt_state`, `data`, `meta`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from tensorboardX import SummaryWriter
from tqdm import tqdm

from llada_jax import errors
from llada_jax import sharding
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.checkpoints import hub
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import loading
from llada_jax.config import ModelConfig, config_from_model_dir
from llada_jax import models
from llada_jax.sampling.sampler import generate
from llada_jax.training import data as data_lib
from llada_jax.training import flops as flops_lib
from llada_jax.training import objectives
from llada_jax.training import lock
from llada_jax.training import optimizer as optimizer_lib
from llada_jax.training import resume
from llada_jax.training import validate
from llada_jax.training import workdir as workdir_lib

def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ---- the compiled step ----------------------------------------------------------

def make_noise(rng: jax.Array, batch: dict[str, jax.Array], kind: str, mask_id: int
               ) -> objectives.Noise:
  if kind == "sft":
    return objectives.sft_noise(rng, batch["input_ids"], batch["prompt_len"], mask_id)
  return objectives.pretrain_noise(rng, batch["input_ids"], mask_id)


def model_loss(model: nnx.Module, ids_BL: jax.Array, noise: objectives.Noise,
               vocab_chunk: int = 0, attention_mask_BL: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The masked-diffusion loss (nats) of `model` on `noise.noisy_BL`, plus the
  weighted router losses of MoE models -> (loss, {aux loss name: unweighted value}).

  vocab_chunk > 0 (and < V): cross-entropy over chunks of that many vocabulary
  columns from the final hidden states, never forming the [B, L, V] logits;
  0: from the model's full float32 logits. Equal to float tolerance.
  """
  cfg = model.config
  chunked = 0 < vocab_chunk < cfg.embedding_size
  out, aux = model.forward_with_aux(noise.noisy_BL, attention_mask_BL, head=not chunked)
  if not chunked:
    loss = objectives.masked_loss(out, ids_BL, noise)
  else:
    scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0
    loss = objectives.chunked_masked_loss(out, model.head_DV().astype(out.dtype), ids_BL,
                                          noise, vocab_chunk, scale)
  coefs = {"load_balancing_loss": cfg.router_aux_loss_coef,
           "router_z_loss": cfg.router_z_loss_coef}
  return loss + sum(coefs[k] * v for k, v in aux.items()), aux


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               model_cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, kind: str, micro_batches: int, seed: int,
               vocab_chunk: int = 0) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimiser step on a global batch.

  state: {"params": float32 param pytree, "opt_state", "step": int32 [],
    "lr_scale": float32 [] (the rollbacks' factor on the schedule; traced, so
    changing it reuses the compiled step)}.
  batch: {"input_ids": int32 [B, L]} (+ "prompt_len": int32 [B] for SFT).
  A non-finite loss or gradient leaves params and optimiser state untouched
  (metrics["finite"] = 0); the step counter advances either way.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state["step"])
  noise = make_noise(rng, batch, kind, model_cfg.mask_token_id)

  def loss_fn(params, mb):
    ids_BL, nz = mb
    loss, aux = model_loss(nnx.merge(graphdef, params), ids_BL, nz, vocab_chunk,
                           nz.attention_mask_BL)
    return loss, {"masked_tokens": jnp.sum(nz.masked_BL),
                  **{k: v / micro_batches for k, v in aux.items()}}  # summed over micro-batches

  loss, grads, aux = optimizer_lib.accumulate_gradients(
      loss_fn, state["params"], (batch["input_ids"], noise), micro_batches)
  masked = aux.pop("masked_tokens")
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  # AdamW's update is -lr · (...), so scaling it scales the learning rate.
  updates = jax.tree.map(lambda u: u * state["lr_scale"].astype(u.dtype), updates)
  params = optax.apply_updates(state["params"], updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {"params": keep(params, state["params"]),
               "opt_state": keep(opt_state, state["opt_state"]),
               "step": state["step"] + 1, "lr_scale": state["lr_scale"]}
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
             "lr": schedule(state["step"]) * state["lr_scale"], "masked_tokens": masked, **aux}
  return new_state, metrics


def eval_step(params: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array, *,
              graphdef: nnx.GraphDef, model_cfg: ModelConfig, vocab_chunk: int = 0
              ) -> jax.Array:
  """Negative ELBO (nats per scored token) of a held-out batch, one noise draw."""
  noise = objectives.elbo_noise(rng, batch["input_ids"], model_cfg.mask_token_id,
                                batch.get("prompt_len"))
  return model_loss(nnx.merge(graphdef, params), batch["input_ids"], noise, vocab_chunk)[0]


# ---- sharded state ----------------------------------------------------------------

def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The training mesh of `cfg.mesh` over `devices` (None: all of this process's view)."""
  return sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices=devices)


def batch_sharding(mesh: Mesh, rules=sharding.DEFAULT_RULES) -> NamedSharding:
  """Rows over the batch axes (data x fsdp): for [B, L] token arrays."""
  return NamedSharding(mesh, sharding.logical_to_spec(("batch", None), rules, mesh))


def batch_shardings(mesh: Mesh, kind: str, rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
  """Shardings of a batch dict: input_ids [B, L] (+ prompt_len [B] for SFT)."""
  rows = batch_sharding(mesh, rules)
  out = {"input_ids": rows}
  if kind == "sft":
    out["prompt_len"] = NamedSharding(mesh, P(rows.spec[0]))
  return out


def state_shardings(graphdef_state: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES) -> tuple[dict[str, Any], dict[str, Any]]:
  """(abstract state, shardings): params by the logical rules, the optimiser's
  per-parameter moments like their parameter, its scalars replicated."""
  param_sh = nnx.to_pure_dict(sharding.param_shardings(graphdef_state, mesh, rules))
  params_abs = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                            nnx.to_pure_dict(graphdef_state))
  opt_abs = jax.eval_shape(tx.init, params_abs)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"params": param_sh, "opt_state": opt_sh, "step": replicated,
               "lr_scale": replicated}
  abstract = {"params": params_abs, "opt_state": opt_abs,
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "lr_scale": jax.ShapeDtypeStruct((), jnp.float32)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def compile_train_step(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh,
                       rules=sharding.DEFAULT_RULES):
  """(jitted step, abstract state with shardings, optimizer, graphdef) for `cfg` on `mesh`."""
  graphdef, abstract_params = nnx.split(models.abstract(model_cfg, mesh=mesh, rules=rules))
  tx, schedule = optimizer_lib.from_config(cfg)
  abstract, shardings = state_shardings(abstract_params, tx, mesh, rules)
  step_fn = functools.partial(train_step, graphdef=graphdef, model_cfg=model_cfg, tx=tx,
                              schedule=schedule, kind=cfg.kind,
                              micro_batches=cfg.micro_batches, seed=cfg.seed,
                              vocab_chunk=cfg.loss_vocab_chunk)
  batch_sh = batch_shardings(mesh, cfg.kind, rules)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  return jitted, abstract, tx, graphdef


def init_state(cfg, model_cfg: ModelConfig, abstract: dict[str, Any],
               tx: optax.GradientTransformation, init_params: Any = None) -> dict[str, Any]:
  """Fresh sharded state: random params (or `init_params`) and a new optimiser state."""
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  if init_params is None:
    init_params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(models.init(model_cfg, cfg.seed))[1]),
                          out_shardings=shardings["params"])()
  params = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.float32), init_params),
                          shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return counters(abstract, {"params": params, "opt_state": opt_state}, 0, 1.0)


def counters(abstract: dict[str, Any], state: dict[str, Any], step: int, lr_scale: float
             ) -> dict[str, Any]:
  """`state` (params, opt_state) with the step counter and learning-rate scale put on device."""
  return {**state, "step": jax.device_put(jnp.int32(step), abstract["step"].sharding),
          "lr_scale": jax.device_put(jnp.float32(lr_scale), abstract["lr_scale"].sharding)}


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch from this host's slice (rows split over the data axes)."""
  shardings = batch_shardings(mesh, "sft" if "prompt_len" in local else "pretrain")
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


# ---- set-up: tokenizer, model config, data -------------------------------------

def _has_tokenizer(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.model",
                                                                   "tokenizer.json"))


def resolve_tokenizer(cfg, workdir: str, train_docs) -> tuple[Any, str]:
  """(tokenizer, its directory): the configured one, init_from's, the workdir's
  (on resume), or a SentencePiece model trained here on the training documents.
  Pre-tokenized data may go without one: (None, None)."""
  for directory in (cfg.tokenizer.path, cfg.init_from, workdir):
    if directory and _has_tokenizer(directory):
      return tokenizer_lib.load_tokenizer(directory), directory
  if cfg.tokenizer.path:
    raise FileNotFoundError(f"config.tokenizer.path: no tokenizer.model / tokenizer.json in "
                            f"{cfg.tokenizer.path!r}")
  if not cfg.tokenizer.train_vocab_size:
    if cfg.kind == "pretrain" and len(train_docs) and "ids" in train_docs[0]:
      return None, None  # pre-tokenized documents
    raise ValueError("config.tokenizer: set `path`, or `train_vocab_size` to train one")
  out_dir = workdir
  if jax.process_index() == 0:
    corpus = os.path.join(out_dir, "tokenizer_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      written = 0
      for doc in train_docs:
        text = doc.get("text") or "\n".join(
            [doc.get("prompt", ""), doc.get("response", "")]
            + [m.get("content", "") for m in doc.get("messages", [])])
        f.write(text.replace("\n\n", "\n") + "\n")
        written += len(text)
        if written > 50_000_000:
          break
    log(f"training a SentencePiece tokenizer (vocab {cfg.tokenizer.train_vocab_size}) "
        f"on {written:,} characters")
    tokenizer_lib.train([corpus], cfg.tokenizer.train_vocab_size, out_dir)
    os.remove(corpus)
  _sync("tokenizer")
  return tokenizer_lib.load_tokenizer(out_dir), out_dir


def model_config(cfg, tokenizer) -> ModelConfig:
  """The model's config (init_from's architecture if given), checked against the tokenizer."""
  model = dict(cfg.model)
  if cfg.init_from:
    numerics = {k: model[k] for k in ("dtype", "attention", "remat_policy", "scan_layers")}
    model_cfg = config_from_model_dir(cfg.init_from, param_dtype="float32", **numerics)
  else:
    model_cfg = ModelConfig.from_dict({**model, "param_dtype": "float32"})
  if tokenizer is None:
    pass
  elif tokenizer.vocab_size > model_cfg.embedding_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                     f"embedding_size={model_cfg.embedding_size}")
  for field, tok_field in (("mask_token_id", "mask_id"), ("eos_token_id", "eos_id")):
    want, got = getattr(model_cfg, field), getattr(tokenizer, tok_field, None)
    if got is not None and want != got:
      raise ValueError(f"config.model.{field}={want} but the tokenizer's {tok_field} is {got}")
  if cfg.seq_len > model_cfg.max_sequence_length:
    raise ValueError(f"config.seq_len={cfg.seq_len} exceeds the model's "
                     f"max_sequence_length={model_cfg.max_sequence_length}")
  return model_cfg


def load_documents(cfg):
  """(training documents, held-out documents) as grain MapDatasets."""
  d = cfg.data
  data_dir = d.data_dir or None
  docs = data_lib.documents(d.source, tfds_split=d.tfds_split, data_dir=data_dir, field=d.field)
  if d.eval_source or d.source.startswith("tfds:"):
    eval_docs = data_lib.documents(d.eval_source or d.source, tfds_split=d.tfds_eval_split,
                                   data_dir=data_dir, field=d.field)
    return grain.MapDataset.source(docs), grain.MapDataset.source(eval_docs)
  return data_lib.split_heldout(docs, d.eval_fraction, cfg.seed)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _host_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This host's rows of a batch that every host holds in full."""
  n, i = jax.process_count(), jax.process_index()
  return {k: v[i * (len(v) // n):(i + 1) * (len(v) // n)] for k, v in batch.items()}


# ---- the loop -----------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True


class _StepEnd:
  """The host's end of a step, once its results are read: non-finite steps are
  counted; log steps get a metrics.jsonl row, a log line and TensorBoard scalars.

  Other steps read one scalar (`finite`) from the device, so the host can stay
  a step ahead of it.
  """

  def __init__(self, cfg, meta: dict[str, Any], progress, metrics_file, writer,
               flops_per_step: float, peak: float, on_step: Callable[[int], None] | None):
    self.cfg, self.meta, self.progress = cfg, meta, progress
    self.metrics_file, self.writer, self.on_step = metrics_file, writer, on_step
    self.flops_per_step, self.peak = flops_per_step, peak  # per device
    self.in_a_row = 0
    self.last = {"loss": float("nan")}
    self.restart()

  def restart(self) -> None:
    """A new throughput window (after a pause: evaluation, rollback)."""
    self.window_t, self.window_steps = time.time(), 0

  def rewind(self, step: int) -> None:
    """After a rollback to `step`: no non-finite steps in a row, a new window."""
    self.in_a_row = 0
    self.progress.reset(total=self.cfg.total_steps)
    self.progress.update(step)
    self.restart()

  def __call__(self, step: int, metrics: dict[str, jax.Array], read_all: bool = False) -> bool:
    """Ends `step`; True if it is the last of too many non-finite steps in a row."""
    cfg = self.cfg
    log_now = step % cfg.log_every == 0 or step == cfg.total_steps
    if log_now or read_all:
      self.last = {k: float(v) for k, v in jax.device_get(metrics).items()}
      finite = bool(self.last["finite"])
    else:
      finite = bool(metrics["finite"])  # waits for the step
    self.window_steps += 1
    self.progress.update(1)
    if log_now and self.metrics_file:
      self.metrics_file.write(json.dumps({"step": step, **self.last}) + "\n")
      self.metrics_file.flush()
    if not finite:
      self.meta["skipped_steps"] += 1
      self.in_a_row += 1
      log(f"step {step}: non-finite loss/gradient, skipped ({self.in_a_row} in a row)")
      if self.in_a_row >= cfg.max_nonfinite_in_a_row:
        return True
    else:
      self.in_a_row = 0
    self.meta["step"] = step
    if log_now:
      self._log(step)
    if self.on_step:
      self.on_step(step)
    return False

  def _log(self, step: int) -> None:
    elapsed = time.time() - self.window_t
    steps_s = self.window_steps / max(elapsed, 1e-9)
    tok_s = steps_s * self.cfg.batch_size * self.cfg.seq_len
    tflops = steps_s * self.flops_per_step / 1e12
    last = self.last
    line = {"loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"],
            "tokens_per_s": tok_s, "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak, "skipped_steps": self.meta["skipped_steps"]}
    router = {k: last[k] for k in ("load_balancing_loss", "router_z_loss") if k in last}
    line.update(router)  # MoE models: the router losses, logged apart from the loss
    log(f"step {step}/{self.cfg.total_steps} loss {line['loss']:.4f} lr {line['lr']:.3g} "
        f"grad_norm {line['grad_norm']:.3f} tokens/s {tok_s:,.0f} "
        f"TFLOP/s/device {tflops:.4g} MFU {100 * line['mfu']:.2f}% "
        f"skipped {self.meta['skipped_steps']}"
        + "".join(f" {k} {v:.4f}" for k, v in router.items()))
    _scalars(self.writer, step, line)
    self.window_t, self.window_steps = time.time(), 0


def _roll_back(cfg, mngr, abstract: dict[str, Any], iterator, meta: dict[str, Any], step: int,
               in_a_row: int) -> tuple[dict[str, Any], int]:
  """(state, step) of the latest checkpoint, the learning rate scaled down; the
  data iterator is restored with it. Same compiled step: the scale is traced."""
  mngr.wait_until_finished()
  back = mngr.latest_step()
  if back is None:
    raise RuntimeError(f"{in_a_row} non-finite steps in a row and no checkpoint to "
                       "roll back to")
  if meta["rollbacks"] >= cfg.max_rollbacks:
    raise RuntimeError(f"{in_a_row} non-finite steps in a row after {meta['rollbacks']}"
                       f" rollbacks (config.max_rollbacks); giving up at step {step}")
  meta["lr_scale"] *= cfg.rollback_lr_scale
  back, restored, _ = resume.restore_intact(
      mngr, lambda s: workdir_lib.restore(mngr, s, abstract, iterator), back)
  meta["rollbacks"] += 1
  log(f"rolled back to step {back} with the learning rate scaled by {meta['lr_scale']:g}"
      f" (was at step {step})")
  return counters(abstract, restored, back, meta["lr_scale"]), back


def evaluate(eval_fn: Callable, params, batches, mesh: Mesh, samples: int, seed: int) -> float:
  """Held-out negative ELBO in bits per scored token (mean over batches and draws)."""
  total = 0.0
  for i, batch in enumerate(batches):
    gb = global_batch(_host_rows(batch), mesh)
    for j in range(samples):
      rng = jax.random.fold_in(jax.random.key(seed + 1), i * samples + j)
      total = total + eval_fn(params, gb, rng)  # summed on device, read once
  return float(total) / (len(batches) * samples) / math.log(2)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the final metrics.

  The config and the workdir are checked before anything is written, and the
  workdir's lock is held throughout (`training/validate.py`, `training/lock.py`).
  `on_step(step)` (optional) runs on the host after each step has ended there
  (checked, logged), before a checkpoint of that step is started.
  """
  if cfg.get("init_from"):  # a directory, or a Hub id resolved to its local snapshot
    cfg.init_from = hub.resolve_model_dir(cfg.init_from)
  validate.check_config(cfg, jax.process_count(), jax.device_count())
  validate.check_workdir(os.path.abspath(workdir))
  with lock.held(os.path.abspath(workdir), jax.process_index() == 0):
    return _train_and_evaluate(cfg, os.path.abspath(workdir), on_step)


def _train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                        on_step: Callable[[int], None] | None) -> dict[str, Any]:
  t_start = time.time()
  mesh = make_mesh(cfg)
  train_docs, eval_docs = load_documents(cfg)
  tokenizer, tokenizer_dir = resolve_tokenizer(cfg, workdir, train_docs)
  model_cfg = model_config(cfg, tokenizer)
  validate.check_resume(workdir, model_cfg.to_hf(), json.loads(cfg.to_json_best_effort()))
  pc, pi = jax.process_count(), jax.process_index()
  dataset = data_lib.train_dataset(
      train_docs, tokenizer, kind=cfg.kind, seq_len=cfg.seq_len, batch_size=cfg.batch_size // pc,
      seed=cfg.seed, eos_id=model_cfg.eos_token_id, process_index=pi, process_count=pc,
      prefetch=cfg.data.prefetch)
  iterator = iter(dataset)
  evals = data_lib.eval_batches(eval_docs, tokenizer, kind=cfg.kind, seq_len=cfg.seq_len,
                                batch_size=cfg.eval_batch_size, num_batches=cfg.eval_batches,
                                eos_id=model_cfg.eos_token_id)
  unigram_bits = data_lib.unigram_entropy_bits(evals)

  mngr = workdir_lib.manager(workdir, cfg.checkpoint.every_steps, cfg.checkpoint.keep)
  meta = {"step": 0, "lr_scale": 1.0, "skipped_steps": 0, "rollbacks": 0}
  latest = mngr.latest_step()
  step_fn, abstract, tx, graphdef = compile_train_step(cfg, model_cfg, mesh)
  if latest is not None:
    latest, restored, meta = resume.restore_intact(
        mngr, lambda s: workdir_lib.restore(mngr, s, abstract, iterator))
    resume.trim_metrics(workdir, latest)
    state = counters(abstract, restored, latest, meta["lr_scale"])
    log(f"resumed from step {latest} of {layout.checkpoint_dir(workdir)}")
  else:
    init_params = None
    if cfg.init_from:
      loaded = loading.load(cfg.init_from, dtype=model_cfg.dtype, param_dtype="float32",
                              mesh=mesh)
      init_params = nnx.to_pure_dict(nnx.split(loaded)[1])
      log(f"initialised from {cfg.init_from}")
    state = init_state(cfg, model_cfg, abstract, tx, init_params)
  if jax.process_index() == 0:  # only now: a refused or failed restore leaves them as they were
    workdir_lib.write_model_files(workdir, model_cfg, tokenizer_dir, cfg.to_json_best_effort(
        indent=2))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, model_cfg=model_cfg,
                                      vocab_chunk=cfg.loss_vocab_chunk))

  n_devices = jax.device_count()
  peak, peak_source = ((cfg.peak_flops, "config") if cfg.peak_flops
                       else flops_lib.peak_flops_per_device())
  log(f"model: {model_cfg.num_params():,} parameters; mesh {dict(mesh.shape)} on "
      f"{n_devices} {jax.devices()[0].platform} device(s); peak {peak / 1e12:.3g} TFLOP/s "
      f"per device ({peak_source}); held-out unigram entropy {unigram_bits:.3f} bits/token")

  writer = _summary_writer(workdir)
  metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if pi == 0 else None
  preemption = _Preemption()
  step = int(latest or 0)
  flops_per_step = (cfg.batch_size * cfg.seq_len
                    * flops_lib.flops_per_token(model_cfg, cfg.seq_len) / n_devices)
  step_end = _StepEnd(cfg, meta, _progress(cfg.total_steps, step), metrics_file, writer,
                    flops_per_step, peak, on_step)
  # The host runs one step ahead: step n+1 is dispatched (and its batch made)
  # before step n's metrics are read. Checkpoints, evaluations and preemption
  # need step n's state, so there the host waits for step n first.
  pending = None  # (step, metrics) dispatched but not yet ended on the host
  batch = global_batch(next(iterator), mesh) if step < cfg.total_steps else None
  while step < cfg.total_steps:
    state, metrics = step_fn(state, batch)
    step += 1
    preempted = preemption.requested or (pc > 1 and mngr.reached_preemption(step))
    eval_now = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.total_steps
    save_now = mngr.should_save(step)
    sync = step == cfg.total_steps or save_now or eval_now or preempted
    if not sync:
      batch = global_batch(next(iterator), mesh)
    ending = ([pending] if pending else []) + ([(step, metrics)] if sync else [])
    pending = None if sync else (step, metrics)
    diverged = None
    for s, m in ending:
      if step_end(s, m, read_all=sync):
        diverged = s
        break
    if diverged is not None:
      state, step = _roll_back(cfg, mngr, abstract, iterator, meta, diverged, step_end.in_a_row)
      step_end.rewind(step)
      pending, batch = None, global_batch(next(iterator), mesh)
      continue
    if not sync:
      continue
    if save_now:
      workdir_lib.save(mngr, step, state, iterator, meta)
    if eval_now:
      bits = evaluate(eval_fn, state["params"], evals, mesh, cfg.eval_samples, cfg.seed)
      log(f"step {step}: held-out ELBO {bits:.4f} bits/token "
          f"(unigram entropy {unigram_bits:.4f})")
      _scalars(writer, step, {"eval_elbo_bits_per_token": bits})
      step_end.restart()
    if preempted:
      workdir_lib.save(mngr, step, state, iterator, meta, force=True)
      mngr.wait_until_finished()
      log(f"preempted: saved step {step}, exiting")
      step_end.progress.close()
      return {"step": step, "preempted": True, "skipped_steps": meta["skipped_steps"],
              "rollbacks": meta["rollbacks"], **step_end.last}
    if step < cfg.total_steps:
      batch = global_batch(next(iterator), mesh)
  last = step_end.last
  if mngr.latest_step() != step:
    workdir_lib.save(mngr, step, state, iterator, meta, force=True)
  step_end.progress.close()
  bits = evaluate(eval_fn, state["params"], evals, mesh, cfg.eval_samples, cfg.seed)
  _scalars(writer, step, {"eval_elbo_bits_per_token": bits})
  write_samples(cfg, graphdef, state["params"], evals, tokenizer, mesh)
  mngr.wait_until_finished()
  mngr.close()
  result = {"step": step, "loss": last["loss"], "eval_elbo_bits_per_token": bits,
            "unigram_entropy_bits_per_token": unigram_bits,
            "skipped_steps": meta["skipped_steps"], "rollbacks": meta["rollbacks"],
            "seconds": time.time() - t_start}
  log(f"done: step {step}, loss {last['loss']:.4f}, held-out ELBO {bits:.4f} bits/token, "
      f"unigram entropy of the held-out text {unigram_bits:.4f} bits/token, "
      f"{result['seconds']:.0f} s")
  if metrics_file:
    metrics_file.close()
  if writer:
    writer.close()
  return result


def write_samples(cfg, graphdef, params, evals, tokenizer, mesh) -> None:
  """Logs a few samples: held-out prompts continued by the diffusion sampler."""
  s = cfg.samples
  if not s.num or tokenizer is None:
    return
  model = nnx.merge(graphdef, params)
  prompt_ids = np.asarray(evals[0]["input_ids"][:s.num, :s.prompt_len])
  out = generate(model, prompt_ids, steps=s.steps, gen_length=s.gen_length,
                 block_length=s.gen_length)
  for prompt, row in zip(prompt_ids, np.asarray(out)):
    log(f"sample: {tokenizer.decode(prompt.tolist())!r} -> "
        f"{tokenizer.decode(row[len(prompt):].tolist())!r}")
  del mesh


def _summary_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _scalars(writer, step: int, values: dict[str, float]) -> None:
  if writer:
    for k, v in values.items():
      writer.add_scalar(k, v, step)
    writer.flush()


def _progress(total: int, initial: int):
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
              disable=not sys.stderr.isatty() or jax.process_index() != 0)


def _multihost_environment() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def main(argv, on_step: Callable[[int], None] | None = None) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  errors.quiet_library_logs()  # and its failures, which we report in one line
  cfg = flags.FLAGS.config
  if cfg.distributed or _multihost_environment():
    jax.distributed.initialize()
  with errors.report_errors("train"):
    train_and_evaluate(cfg, flags.FLAGS.workdir, on_step)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, model files)")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=validate.parse_flags)
