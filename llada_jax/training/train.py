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

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

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
from llada_jax import paths
from llada_jax import sharding
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.checkpoints import hub
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import loading
from llada_jax.config import ModelConfig, config_from_model_dir
from llada_jax.layers.masks import BlockDiffusion
from llada_jax import models
from llada_jax.sampling.sampler import generate
from llada_jax.training import block_objectives
from llada_jax.training import data as data_lib
from llada_jax.training import flops as flops_lib
from llada_jax.training import objectives
from llada_jax.training import lock
from llada_jax.training import optimizer as optimizer_lib
from llada_jax.training import resume
from llada_jax.training import validate
from llada_jax.training import vrpo
from llada_jax.training import workdir as workdir_lib

def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


# ---- the compiled step ----------------------------------------------------------

def model_loss(model: nnx.Module, ids_BL: jax.Array, noise: objectives.Noise,
               vocab_chunk: int = 0, attention_mask_BL: jax.Array | None = None, *,
               block_length: int = 0, embed_noise_BLD: jax.Array | None = None,
               cap_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The masked-diffusion loss (nats) of `model` on `noise.noisy_BL`, plus the
  weighted router losses of MoE models -> (loss, {aux loss name: unweighted value}).

  vocab_chunk > 0 (and < V): cross-entropy over chunks of that many vocabulary
  columns from the final hidden states, never forming the [B, L, V] logits;
  0: from the model's full float32 logits. Equal to float tolerance.
  block_length > 0: the block-diffusion forward of [x_t ; x_0] (`block_objectives`),
  scored on the noisy half; `embed_noise_BLD` perturbs the noisy half's embeddings.
  cap_weight > 0 (full logits only): + cap_weight · the CAP entropy term, which
  the aux dict also holds ("cap_entropy", unweighted).
  """
  cfg = model.config
  chunked = 0 < vocab_chunk < cfg.embedding_size
  if block_length:
    input_ids, positions_L = block_objectives.model_input(noise.noisy_BL, ids_BL)
    out, aux = model.forward_with_aux(
        input_ids, BlockDiffusion(block_length), head=not chunked, positions_L=positions_L,
        embed_noise_BLD=block_objectives.embed_noise_input(embed_noise_BLD))
    out = block_objectives.noisy_half(out)
  else:
    out, aux = model.forward_with_aux(noise.noisy_BL, attention_mask_BL, head=not chunked)
  if not chunked:
    loss = objectives.masked_loss(out, ids_BL, noise)
  else:
    scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0
    loss = objectives.chunked_masked_loss(out, model.head_DV().astype(out.dtype), ids_BL,
                                          noise, vocab_chunk, scale)
  loss = loss + objectives.router_penalty(cfg, aux)
  if cap_weight:
    aux = {**aux, "cap_entropy": objectives.cap_entropy(out, ids_BL, noise)}
    loss = loss + cap_weight * aux["cap_entropy"]
  return loss, aux


# ---- the objective of each `kind` -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossOptions:
  """What the objectives read from the configs (static under jit)."""
  mask_id: int
  d_model: int
  vocab_chunk: int = 0
  cap_weight: float = 0.0
  block: block_objectives.BlockSettings | None = None


def loss_options(cfg, model_cfg: ModelConfig) -> LossOptions:
  block = None
  if objective(cfg).block:
    block = block_objectives.BlockSettings(
        cfg.block_length, cfg.t_min, cfg.t_max, cfg.complementary_masking,
        cfg.embed_noise_std, cfg.embed_noise_steps, crop_prob=objectives.CROP_PROB)
  return LossOptions(model_cfg.mask_token_id, model_cfg.d_model, cfg.loss_vocab_chunk,
                     cfg.get("cap_weight", 0.0), block)


def _diffusion_noise(rng, batch, step, o: LossOptions):
  """LLaDA's forward process (SPEC §5): pre-training, or SFT when rows carry prompt_len."""
  del step
  if "prompt_len" not in batch:
    return objectives.pretrain_noise(rng, batch["input_ids"], o.mask_id)
  return objectives.sft_noise(rng, batch["input_ids"], batch["prompt_len"], o.mask_id)


def _block_noise(rng, batch, step, o: LossOptions, train: bool = True):
  """`block_objectives.block_inputs` (an `objectives.Inputs`: its rows may be 2B with
  complements); held out: t ~ U[0, 1], no complement or embedding noise."""
  s = o.block if train else block_objectives.BlockSettings(o.block.block_length)
  return block_objectives.block_inputs(rng, batch["input_ids"], o.mask_id, s, o.d_model, step,
                                       batch.get("prompt_len"))


def _metrics(loss, aux, masked_BL, micro_batches: int):
  """(loss, metrics) of one micro-batch; summed over micro-batches: the router losses
  are per-micro-batch means, the CAP term is normalised by the whole batch like the loss."""
  return loss, {"masked_tokens": jnp.sum(masked_BL),
                **{k: v if k == "cap_entropy" else v / micro_batches for k, v in aux.items()}}


def _diffusion_loss(model, batch, noise, reference, *, options: LossOptions, micro_batches: int,
                    train: bool = True):
  """Pre-training / SFT: one micro-batch's loss (normalised by the global batch through
  the noise's weights) and its metrics."""
  del reference
  loss, aux = model_loss(model, batch["input_ids"], noise, options.vocab_chunk,
                         noise.attention_mask_BL, cap_weight=options.cap_weight if train else 0.0)
  return _metrics(loss, aux, noise.masked_BL, micro_batches)


def _block_loss(model, batch, inputs: objectives.Inputs, reference, *, options: LossOptions,
                micro_batches: int, train: bool = True):
  """Block diffusion: the loss of the [x_t ; x_0] forward on `inputs` (its own rows)."""
  del batch, reference
  loss, aux = model_loss(model, inputs.targets_BL, inputs.noise, options.vocab_chunk,
                         inputs.noise.attention_mask_BL, block_length=options.block.block_length,
                         embed_noise_BLD=inputs.embed_noise_BLD,
                         cap_weight=options.cap_weight if train else 0.0)
  return _metrics(loss, aux, inputs.noise.masked_BL, micro_batches)


def _diffusion_elbo(model, batch, rng, options: LossOptions):
  """Held-out negative ELBO (nats per scored token): the stratified ELBO noise."""
  noise = objectives.elbo_noise(rng, batch["input_ids"], options.mask_id, batch.get("prompt_len"))
  return model_loss(model, batch["input_ids"], noise, options.vocab_chunk)[0]


def _block_elbo(model, batch, rng, options: LossOptions):
  """Held-out negative ELBO of the block-diffusion model (t ~ U[0, 1], one draw)."""
  inputs = _block_noise(rng, batch, 0, options, train=False)
  return _block_loss(model, batch, inputs, None, options=options, micro_batches=1,
                     train=False)[0]


class Objective(NamedTuple):
  """What a training kind (`config.kind`) puts into the one train step.

  data: the rows the data pipeline builds (`data.ROW_BUILDERS`: "pretrain" packed
    documents, "sft" + prompt_len, "vrpo" preference pairs).
  noise(rng, batch, step, options): the forward process's draw for the whole
    global batch, a pytree with rows on axis 0 (so micro-batches see the noise
    of one large batch).
  loss(model, batch, noise, reference, *, options, micro_batches) ->
    (loss, metrics) of one micro-batch, both normalised by the global batch
    (micro-batches sum to the batch's values).
  elbo(model, batch, rng, options): held-out negative ELBO, nats per scored token.
  vectors: batch keys of [B] arrays; `rows` keys are [B, L] token rows.
  reference: whether the step takes a frozen reference model's params.
  evaluate(model, reference, batch, rng, *, options): held-out metrics
    {name: mean over the batch}, besides the ELBO; or None.
  check_doc: validates a JSONL training line (refused lines are reported and
    skipped), or None.
  forward_rows: model forward-and-backward passes per batch row, for FLOPs.
  block: a block-diffusion kind (reads the block settings); its model input is
    [x_t ; x_0], `length_factor` = 2 times seq_len.
  """
  data: str
  noise: Callable[..., Any] = _diffusion_noise
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] = _diffusion_loss
  elbo: Callable[..., jax.Array] = _diffusion_elbo
  rows: tuple[str, ...] = ("input_ids",)
  vectors: tuple[str, ...] = ()
  reference: bool = False
  evaluate: Callable[..., dict[str, jax.Array]] | None = None
  check_doc: Callable[[dict], Any] | None = None
  forward_rows: float = 1.0
  block: bool = False
  length_factor: int = 1


def _block_objective(cfg, data: str) -> Objective:
  # [x_t ; x_0]: 2L positions (and 2B rows with complements).
  return Objective(data, noise=_block_noise, loss=_block_loss, elbo=_block_elbo,
                   vectors=("prompt_len",) if data == "sft" else (),
                   forward_rows=2 if cfg.get("complementary_masking") else 1, block=True,
                   length_factor=2)


def _vrpo_objective(cfg) -> Objective:
  s = vrpo.Settings.from_config(cfg.vrpo)

  def noise(rng, batch, step, o: LossOptions):
    del step
    return vrpo.draw(rng, batch, o.mask_id, s)

  def loss(model, batch, noise_, reference, *, options: LossOptions, micro_batches: int):
    return vrpo.loss(model, batch, noise_, reference, s=s, vocab_chunk=options.vocab_chunk,
                     micro_batches=micro_batches)

  def evaluate_(model, reference, batch, rng, *, options: LossOptions):
    return vrpo.evaluate(model, reference, batch, rng, s=s, vocab_chunk=options.vocab_chunk)

  # 2 answers x n samples through the policy (forward and backward, 3 units) and
  # the reference (forward only, 1 unit).
  return Objective("vrpo", noise=noise, loss=loss, rows=("input_ids", "rejected_ids"),
                   vectors=("prompt_len",), reference=True, evaluate=evaluate_,
                   check_doc=data_lib.preference_fields,
                   forward_rows=2 * s.n_samples * (1 + 1 / 3))


# config.kind -> its Objective (validate.KINDS lists the same kinds).
OBJECTIVES: dict[str, Callable[[Any], Objective]] = {
    "pretrain": lambda cfg: Objective("pretrain"),
    "sft": lambda cfg: Objective("sft", vectors=("prompt_len",)),
    "block_pretrain": lambda cfg: _block_objective(cfg, "pretrain"),
    "block_sft": lambda cfg: _block_objective(cfg, "sft"),
    "vrpo": _vrpo_objective,
}


def objective(cfg) -> Objective:
  return OBJECTIVES[cfg.kind](cfg)


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], reference: Any = None, *,
               graphdef: nnx.GraphDef, model_cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, obj: Objective, micro_batches: int, seed: int,
               options: LossOptions | None = None
               ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimiser step on a global batch.

  state: {"params": float32 param pytree, "opt_state", "step": int32 [],
    "lr_scale": float32 [] (the rollbacks' factor on the schedule; traced, so
    changing it reuses the compiled step)}.
  batch: {"input_ids": int32 [B, L]} (+ the kind's other keys: `Objective`).
  reference: the frozen reference model's param pytree (kinds that use one;
    an argument, never differentiated), else None.
  `obj` is the kind's objective (`objective(cfg)`); `options` default to the model's.
  A non-finite loss or gradient leaves params and optimiser state untouched
  (metrics["finite"] = 0); the step counter advances either way.
  """
  options = options or LossOptions(model_cfg.mask_token_id, model_cfg.d_model)
  rng = jax.random.fold_in(jax.random.key(seed), state["step"])
  noise = obj.noise(rng, batch, state["step"], options)

  def loss_fn(params, mb):
    ref_model = None if reference is None else nnx.merge(graphdef, reference)
    return obj.loss(nnx.merge(graphdef, params), *mb, ref_model, options=options,
                    micro_batches=micro_batches)

  loss, grads, aux = optimizer_lib.accumulate_gradients(
      loss_fn, state["params"], (batch, noise), micro_batches)
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
             "lr": schedule(state["step"]) * state["lr_scale"], **aux}
  return new_state, metrics


def eval_step(params: dict[str, Any], batch: dict[str, jax.Array], rng: jax.Array, *,
              graphdef: nnx.GraphDef, model_cfg: ModelConfig, obj: Objective,
              options: LossOptions | None = None) -> dict[str, jax.Array]:
  """{"elbo_bits_per_token": negative ELBO per scored token} of a held-out batch under
  the kind's objective (block kinds: the block-diffusion one), one noise draw (SFT-like
  rows: of the answers)."""
  options = options or LossOptions(model_cfg.mask_token_id, model_cfg.d_model)
  nats = obj.elbo(nnx.merge(graphdef, params), batch, rng, options)
  return {"elbo_bits_per_token": nats / math.log(2)}


def objective_eval_step(params: dict[str, Any], reference: Any, batch: dict[str, jax.Array],
                        rng: jax.Array, *, graphdef: nnx.GraphDef, obj: Objective,
                        options: LossOptions) -> dict[str, jax.Array]:
  """The kind's own held-out metrics of a batch (`Objective.evaluate`), one noise draw."""
  ref_model = None if reference is None else nnx.merge(graphdef, reference)
  return obj.evaluate(nnx.merge(graphdef, params), ref_model, batch, rng, options=options)


# ---- sharded state ----------------------------------------------------------------

def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The (data, fsdp, expert, tensor) mesh of `config.mesh`: ICI sizes per slice
  times the `dcn_*` slice counts (absent = 1)."""
  axes = sharding.EXPERT_MESH_AXES
  return sharding.make_mesh([cfg.mesh.get(a, 1) for a in axes], axes, devices,
                            dcn_shape=[cfg.mesh.get(f"dcn_{a}", 1) for a in axes])


def batch_sharding(mesh: Mesh, rules=sharding.DEFAULT_RULES) -> NamedSharding:
  """Rows over the batch axes (data x fsdp): for [B, L] token arrays."""
  return NamedSharding(mesh, sharding.logical_to_spec(("batch", None), rules, mesh))


def batch_shardings(mesh: Mesh, obj: Objective, rules=sharding.DEFAULT_RULES
                    ) -> dict[str, Any]:
  """Shardings of a batch dict: its [B, L] token rows and [B] vectors, by rows."""
  rows = batch_sharding(mesh, rules)
  return {**{k: rows for k in obj.rows},
          **{k: NamedSharding(mesh, P(rows.spec[0])) for k in obj.vectors}}


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
  """(jitted step, abstract state with shardings, optimizer, graphdef) for `cfg` on `mesh`.

  The model holds no mesh: the step is traced under `sharding.activation_mesh`.
  """
  graphdef, abstract_params = nnx.split(models.abstract(model_cfg))
  tx, schedule = optimizer_lib.from_config(cfg)
  abstract, shardings = state_shardings(abstract_params, tx, mesh, rules)
  obj = objective(cfg)
  step_fn = functools.partial(train_step, graphdef=graphdef, model_cfg=model_cfg, tx=tx,
                              schedule=schedule, obj=obj,
                              micro_batches=cfg.micro_batches, seed=cfg.seed,
                              options=loss_options(cfg, model_cfg))
  in_shardings = (shardings, batch_shardings(mesh, obj, rules))
  if obj.reference:  # step(state, batch, reference params), sharded like the policy's
    in_shardings += (shardings["params"],)
  jitted = jax.jit(sharding.under_mesh(step_fn, mesh, rules), in_shardings=in_shardings,
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
  rows = batch_sharding(mesh)
  shardings = {2: rows, 1: NamedSharding(mesh, P(rows.spec[0]))}
  return {k: jax.make_array_from_process_local_data(shardings[np.ndim(v)], v)
          for k, v in local.items()}


# ---- set-up: tokenizer, model config, data -------------------------------------

def _has_tokenizer(directory: str) -> bool:
  return any(paths.exists(os.path.join(directory, f)) for f in ("tokenizer.model",
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
    if objective(cfg).data == "pretrain" and len(train_docs) and "ids" in train_docs[0]:
      return None, None  # pre-tokenized documents
    raise ValueError("config.tokenizer: set `path`, or `train_vocab_size` to train one")
  if jax.process_index() == 0:
    with paths.local_copy(workdir, ()) as local:  # a bucket workdir: a local temp dir
      _train_tokenizer(cfg, train_docs, local)
      if local != workdir:
        layout.copy_tokenizer_files(local, workdir)
  _sync("tokenizer")
  return tokenizer_lib.load_tokenizer(workdir), workdir


def _train_tokenizer(cfg, train_docs, out_dir: str) -> None:
  """Trains a SentencePiece model on the training documents into `out_dir`."""
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


def model_config(cfg, tokenizer) -> ModelConfig:
  """The model's config (init_from's architecture if given), checked against the tokenizer."""
  model = dict(cfg.model)
  if cfg.init_from:
    model_cfg = config_from_model_dir(cfg.init_from, param_dtype="float32", **_numerics(cfg))
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
  check = objective(cfg).check_doc
  docs = data_lib.documents(d.source, tfds_split=d.tfds_split, data_dir=data_dir, field=d.field,
                            check=check)
  if d.eval_source or d.source.startswith("tfds:"):
    eval_docs = data_lib.documents(d.eval_source or d.source, tfds_split=d.tfds_eval_split,
                                   data_dir=data_dir, field=d.field, check=check)
    return grain.MapDataset.source(docs), grain.MapDataset.source(eval_docs)
  return data_lib.split_heldout(docs, d.eval_fraction, cfg.seed)


def reference_dir(cfg) -> str:
  """The frozen reference model's directory: `reference_from`, else `init_from`."""
  return cfg.get("reference_from") or cfg.init_from


def _numerics(cfg) -> dict[str, Any]:
  """The run's compute settings, applied to every model it loads."""
  return {k: cfg.model[k] for k in ("dtype", "attention", "remat_policy", "scan_layers")}


def check_reference(cfg, model_cfg: ModelConfig) -> None:
  """Refuses a reference model whose architecture or ids differ from the policy's."""
  directory = reference_dir(cfg)
  ref_cfg = config_from_model_dir(directory, param_dtype="float32", **_numerics(cfg))
  validate.check_reference(directory, model_cfg.to_hf(), ref_cfg.to_hf())


def load_reference(cfg, model_cfg: ModelConfig, mesh: Mesh, param_shardings: Any) -> Any:
  """The reference model's float32 params, sharded like the policy's (its own copy: the
  policy's buffers are donated to each step)."""
  loaded = loading.load(reference_dir(cfg), dtype=model_cfg.dtype, param_dtype="float32",
                        mesh=mesh)
  params = nnx.to_pure_dict(nnx.split(loaded)[1])
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(params)


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
    # MoE models: the router losses; CAP's term; VRPO: its metrics (all apart from the loss).
    router = {k: last[k] for k in ("load_balancing_loss", "router_z_loss", "cap_entropy")
              + vrpo.METRICS if k in last}
    line.update(router)
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


def evaluate(eval_fn: Callable, args: tuple, batches, mesh: Mesh, samples: int, seed: int
             ) -> dict[str, float]:
  """Means over held-out batches and noise draws of `eval_fn(*args, batch, rng)`, a
  dict of scalars; the draws are the same at every evaluation."""
  total = None
  for i, batch in enumerate(batches):
    gb = global_batch(_host_rows(batch), mesh)
    for j in range(samples):
      rng = jax.random.fold_in(jax.random.key(seed + 1), i * samples + j)
      out = eval_fn(*args, gb, rng)
      total = out if total is None else jax.tree.map(jnp.add, total, out)  # read once
  return {k: float(v) / (len(batches) * samples) for k, v in total.items()}


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
  workdir = paths.absolute(workdir)  # a directory or a URL (gs://...)
  validate.check_workdir(workdir)
  with lock.held(workdir, jax.process_index() == 0):
    return _train_and_evaluate(cfg, workdir, on_step)


def _train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                        on_step: Callable[[int], None] | None) -> dict[str, Any]:
  t_start = time.time()
  mesh = make_mesh(cfg)
  train_docs, eval_docs = load_documents(cfg)
  tokenizer, tokenizer_dir = resolve_tokenizer(cfg, workdir, train_docs)
  model_cfg = model_config(cfg, tokenizer)
  obj = objective(cfg)
  if obj.reference:
    check_reference(cfg, model_cfg)
  validate.check_resume(workdir, model_cfg.to_hf(), json.loads(cfg.to_json_best_effort()))
  pc, pi = jax.process_count(), jax.process_index()
  dataset = data_lib.train_dataset(
      train_docs, tokenizer, kind=objective(cfg).data, seq_len=cfg.seq_len,
      batch_size=cfg.batch_size // pc, seed=cfg.seed, eos_id=model_cfg.eos_token_id,
      process_index=pi, process_count=pc, prefetch=cfg.data.prefetch)
  iterator = iter(dataset)
  evals = data_lib.eval_batches(eval_docs, tokenizer, kind=objective(cfg).data,
                                seq_len=cfg.seq_len, batch_size=cfg.eval_batch_size,
                                num_batches=cfg.eval_batches, eos_id=model_cfg.eos_token_id)
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
  reference = None
  if obj.reference:
    reference = load_reference(cfg, model_cfg, mesh, jax.tree.map(lambda a: a.sharding,
                                                                  abstract["params"]))
    log(f"reference model (frozen): {reference_dir(cfg)}")
  step_args = (reference,) if obj.reference else ()
  options = loss_options(cfg, model_cfg)
  elbo_fn = jax.jit(sharding.under_mesh(functools.partial(
      eval_step, graphdef=graphdef, model_cfg=model_cfg, obj=obj, options=options), mesh))
  obj_eval_fn = obj.evaluate and jax.jit(sharding.under_mesh(functools.partial(
      objective_eval_step, graphdef=graphdef, obj=obj, options=options), mesh))

  def held_out(params) -> dict[str, float]:
    out = evaluate(elbo_fn, (params,), evals, mesh, cfg.eval_samples, cfg.seed)
    if obj_eval_fn:
      out.update(evaluate(obj_eval_fn, (params, reference), evals, mesh, cfg.eval_samples,
                          cfg.seed))
    return {f"eval_{k}": v for k, v in out.items()}

  n_devices = jax.device_count()
  peak, peak_source = ((cfg.peak_flops, "config") if cfg.peak_flops
                       else flops_lib.peak_flops_per_device())
  log(f"model: {model_cfg.num_params():,} parameters; mesh {dict(mesh.shape)} on "
      f"{n_devices} {jax.devices()[0].platform} device(s); peak {peak / 1e12:.3g} TFLOP/s "
      f"per device ({peak_source}); held-out unigram entropy {unigram_bits:.3f} bits/token")

  writer = _summary_writer(workdir)
  metrics_file = paths.AppendFile(os.path.join(workdir, "metrics.jsonl")) if pi == 0 else None
  preemption = _Preemption()
  step = int(latest or 0)
  flops_per_step = (cfg.batch_size * cfg.seq_len * obj.length_factor * obj.forward_rows
                    * flops_lib.flops_per_token(model_cfg, obj.length_factor * cfg.seq_len)
                    / n_devices)
  step_end = _StepEnd(cfg, meta, _progress(cfg.total_steps, step), metrics_file, writer,
                    flops_per_step, peak, on_step)
  # The host runs one step ahead: step n+1 is dispatched (and its batch made)
  # before step n's metrics are read. Checkpoints, evaluations and preemption
  # need step n's state, so there the host waits for step n first.
  pending = None  # (step, metrics) dispatched but not yet ended on the host
  batch = global_batch(next(iterator), mesh) if step < cfg.total_steps else None
  while step < cfg.total_steps:
    state, metrics = step_fn(state, batch, *step_args)
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
      _log_eval(writer, step, held_out(state["params"]), unigram_bits)
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
  held = held_out(state["params"])
  _scalars(writer, step, held)
  write_samples(cfg, graphdef, state["params"], evals, tokenizer, mesh)
  mngr.wait_until_finished()
  mngr.close()
  bits = held["eval_elbo_bits_per_token"]
  result = {"step": step, "loss": last["loss"], **held,
            "unigram_entropy_bits_per_token": unigram_bits,
            "skipped_steps": meta["skipped_steps"], "rollbacks": meta["rollbacks"],
            "seconds": time.time() - t_start}
  log(f"done: step {step}, loss {last['loss']:.4f}, held-out ELBO {bits:.4f} bits/token, "
      f"unigram entropy of the held-out text {unigram_bits:.4f} bits/token"
      + _objective_line(held) + f", {result['seconds']:.0f} s")
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
  block_length = cfg.block_length if objective(cfg).block else s.gen_length
  out = generate(model, prompt_ids, steps=s.steps, gen_length=s.gen_length,
                 block_length=block_length)
  for prompt, row in zip(prompt_ids, np.asarray(out)):
    log(f"sample: {tokenizer.decode(prompt.tolist())!r} -> "
        f"{tokenizer.decode(row[len(prompt):].tolist())!r}")
  del mesh


def _objective_line(held: dict[str, float]) -> str:
  """The held-out metrics besides the ELBO, for a log line ("" if none)."""
  return "".join(f", {k[5:]} {v:.4f}" for k, v in held.items()
                 if k != "eval_elbo_bits_per_token")


def _log_eval(writer, step: int, held: dict[str, float], unigram_bits: float) -> None:
  log(f"step {step}: held-out ELBO {held['eval_elbo_bits_per_token']:.4f} bits/token "
      f"(unigram entropy {unigram_bits:.4f})" + _objective_line(held))
  _scalars(writer, step, held)


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
