"""Training: mesh equality and shardings, non-finite skip, rollback without a
recompile, exact resume after kill -9, SIGTERM save (short runs of a tiny model
on 8 fake CPU devices).

Run as a program (`python -m tests.test_train --kill_at_step=N ...train flags`),
this file is the training CLI with a fault injected: SIGKILL after step N.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import app, flags
from jax.sharding import NamedSharding

from configs import tiny
from llada_jax import sharding
from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.training import data as data_lib
from llada_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
             vocab_size=128, embedding_size=128, max_sequence_length=64)
OVERRIDES = dict(total_steps=12, batch_size=8, seq_len=16, log_every=4, eval_every=0,
                 eval_batches=1, eval_batch_size=8, eval_samples=1, peak_flops=1e9)


def _config(**changes):
  cfg = tiny.get_config()
  cfg.model.update(MODEL)
  cfg.update(OVERRIDES)
  cfg.optimizer.update(warmup_steps=2, decay_steps=4)
  cfg.checkpoint.update(every_steps=4, keep=3)
  cfg.tokenizer.train_vocab_size = 0
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
  """Pre-tokenized documents with structure to learn: runs of arithmetic sequences."""
  rs = np.random.RandomState(0)
  docs = []
  for _ in range(200):
    start, stride, n = rs.randint(7, 120), rs.randint(1, 4), rs.randint(5, 30)
    docs.append([7 + (start + stride * i) % 120 for i in range(n)])
  path = str(tmp_path_factory.mktemp("data") / "docs.array_record")
  data_lib.write_token_records(path, docs)
  return path


def _flags(cfg_changes):
  out = []
  for k, v in {**{f"model.{k}": v for k, v in MODEL.items()}, **OVERRIDES,
               "optimizer.warmup_steps": 2, "optimizer.decay_steps": 4,
               "checkpoint.every_steps": 4, "checkpoint.keep": 3,
               "tokenizer.train_vocab_size": 0, **cfg_changes}.items():
    out.append(f"--config.{k}={v}")
  return out


def _run(workdir, changes, wait=True, kill_at_step=None):
  program = ["llada_jax.train"] if kill_at_step is None else ["tests.test_train",
                                                               f"--kill_at_step={kill_at_step}"]
  cmd = [sys.executable, "-m", *program, f"--config={REPO}/configs/tiny.py",
         f"--workdir={workdir}"] + _flags(changes)
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, out


def _losses(workdir):
  """step -> loss of the logged steps, the last entry for each (a resumed run rewrites some)."""
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      by_step[row["step"]] = row["loss"]
  return by_step


def _step(mesh, token_data, steps=3, vocab_chunk=0):
  cfg = _config(**{"data.source": token_data, "loss_vocab_chunk": vocab_chunk})
  model_cfg = ModelConfig.from_dict(cfg.model)
  step_fn, abstract, tx, _ = train.compile_train_step(cfg, model_cfg, mesh)
  state = train.init_state(cfg, model_cfg, abstract, tx)
  ids_BL = jax.random.randint(jax.random.key(0), (8, 16), 7, 127)
  losses = []
  for _ in range(steps):
    batch = jax.device_put({"input_ids": ids_BL}, train.batch_sharding(mesh))
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.slow
def test_mesh_2x2x2_equals_one_device_and_shardings_follow_rules(token_data):
  """Also: the vocabulary-chunked loss (3 chunks of 48 of 128, the last overlapping)
  on 8 devices trains like the full logits on one."""
  mesh8 = sharding.make_mesh((2, 2, 2))
  mesh1 = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  state8, losses8 = _step(mesh8, token_data, vocab_chunk=48)
  state1, losses1 = _step(mesh1, token_data)
  # float32 with differently ordered reductions (psum over shards): 1e-5 relative.
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for p8, p1 in zip(jax.tree.leaves(state8["params"]), jax.tree.leaves(state1["params"])):
    np.testing.assert_allclose(np.asarray(p8), np.asarray(p1), rtol=1e-4, atol=1e-5)
  shapes = model_lib.param_shapes(ModelConfig.from_dict({**tiny.get_config().model, **MODEL}))
  for key, shape in shapes.items():
    names = (("layers",) if key.startswith("blocks/") else ()) + model_lib.PARAM_AXES[key]
    want = NamedSharding(mesh8, sharding.logical_to_spec(names, sharding.DEFAULT_RULES,
                                                         mesh8, shape))
    node, mu = state8["params"], state8["opt_state"][1][0].mu
    for part in key.split("/"):
      node, mu = node[part], mu[part]
    assert node.sharding.is_equivalent_to(want, len(shape)), (key, node.sharding, want)
    assert mu.sharding.is_equivalent_to(want, len(shape)), ("adam mu", key)
  assert state8["params"]["blocks"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("variant", ["untied", "tied_scaled"])
def test_chunked_model_loss_and_grads_equal_full_logits(tiny_model, variant):
  """The loss from final hidden states over 4 vocabulary chunks (of 300 of 1024,
  the last overlapping) equals the full-logits loss, value and gradients."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from llada_jax.training import objectives  # pylint: disable=g-import-not-at-top
  model = tiny_model
  if variant == "tied_scaled":
    model = model_lib.init(model.config.replace(weight_tying=True, scale_logits=True), seed=1)
  graphdef, params = nnx.split(model)
  ids_BL = jax.random.randint(jax.random.key(0), (2, 24), 0, 900)
  noise = objectives.pretrain_noise(jax.random.key(1), ids_BL, model.config.mask_token_id,
                                    crop_prob=1.0)  # a crop: the attention mask is used too
  loss = lambda p, chunk: train.model_loss(nnx.merge(graphdef, p), ids_BL, noise, chunk,
                                           noise.attention_mask_BL)[0]
  (full, g_full), (chunked, g_chunked) = (
      jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in (0, 300))
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sft_steps_learn_and_a_nonfinite_step_is_skipped(token_data):
  cfg = _config(**{"data.source": token_data, "kind": "sft"})
  model_cfg = ModelConfig.from_dict(cfg.model)
  mesh = sharding.make_mesh((2, -1, 1))
  step_fn, abstract, tx, _ = train.compile_train_step(cfg, model_cfg, mesh)
  state = train.init_state(cfg, model_cfg, abstract, tx)
  local = {"input_ids": np.tile(np.arange(7, 23, dtype=np.int32), (8, 1)),
           "prompt_len": np.full((8,), 6, np.int32)}
  losses = []
  for _ in range(6):
    state, metrics = step_fn(state, train.global_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  assert int(metrics["finite"]) == 1 and losses[-1] < losses[0], losses
  wte = np.asarray(state["params"]["wte"]).copy()
  wte[9] = np.nan  # a row the batch uses poisons loss and gradient
  state["params"]["wte"] = jax.device_put(wte, state["params"]["wte"].sharding)
  before = jax.tree.map(np.asarray, state)
  state, metrics = step_fn(state, train.global_batch(local, mesh))
  assert int(metrics["finite"]) == 0 and not np.isfinite(float(metrics["loss"]))
  assert int(state["step"]) == 7
  for b, a in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                  jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])):
    np.testing.assert_array_equal(np.asarray(a), b)  # untouched, Adam count included
  assert int(state["opt_state"][1][0].count) == 6


@pytest.mark.slow
def test_divergence_rolls_back_with_lower_lr_without_recompiling(token_data, tmp_path):
  # A learning rate of 1e30 from step 5 blows the weights up to ~1e30, so the
  # RMSNorm statistics overflow and every later loss is NaN: two skipped steps,
  # then a rollback to the step-4 checkpoint with the rate scaled to 1e-2.
  cfg = _config(**{"data.source": token_data, "optimizer.learning_rate": 1e-3,
                   "optimizer.drop_step": 4, "optimizer.drop_learning_rate": 1e30,
                   "optimizer.decay_steps": 0, "rollback_lr_scale": 1e-32,
                   "max_nonfinite_in_a_row": 2, "total_steps": 10, "log_every": 1})
  compiles = []

  def count(event, duration, fun_name="", **kwargs):  # pylint: disable=unused-argument
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(train_step)":
      compiles.append(fun_name)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    result = train.train_and_evaluate(cfg, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert result["rollbacks"] == 1 and result["skipped_steps"] == 2, result
  assert np.isfinite(result["loss"]) and result["step"] == 10
  assert len(compiles) == 1, compiles  # the scaled learning rate is a traced input
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10], rows
  assert [r["finite"] for r in rows[5:7]] == [0, 0]
  np.testing.assert_allclose([r["lr"] for r in rows[7:]], 1e-2, rtol=1e-5)


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(token_data, tmp_path):
  changes = {"data.source": token_data, "log_every": 2}
  rc, out = _run(tmp_path / "straight", changes)
  assert rc == 0, out
  rc, out = _run(tmp_path / "killed", changes, kill_at_step=10)
  assert rc == -signal.SIGKILL, out
  assert sorted(_losses(tmp_path / "killed")) == [2, 4, 6, 8, 10]
  rc, out = _run(tmp_path / "killed", changes)
  assert rc == 0, out
  assert "resumed from step 8" in out or "resumed from step 4" in out, out
  straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
  assert sorted(straight) == sorted(resumed) == [2, 4, 6, 8, 10, 12]  # log steps only
  assert resumed == straight  # bit-identical losses, data included


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(token_data, tmp_path):
  proc = _run(tmp_path, {"data.source": token_data, "total_steps": 100000, "log_every": 1,
                         "checkpoint.every_steps": 100000}, wait=False)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 90
  while time.time() < deadline and (not metrics.exists() or
                                    len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  saved = int(out.split("preempted: saved step ")[1].split(",")[0])
  assert saved >= 3 and (tmp_path / "checkpoints" / str(saved) / "params").is_dir()
  meta = json.loads((tmp_path / "checkpoints" / str(saved) / "meta" / "metadata").read_text())
  assert meta["step"] == saved


@pytest.mark.slow
def test_fine_tune_from_hf_fixture_then_load_and_sample_the_workdir(fixture_dir, tmp_path,
                                                                     capsys):
  """init_from an HF snapshot -> a workdir every consumer reads (load, sample CLI)."""
  import llada_jax  # the public API, as a user calls it
  from llada_jax.frontends import cli as sample

  workdir = str(tmp_path / "ft")
  cfg = _config(init_from=fixture_dir, total_steps=6, seq_len=32, log_every=3,
                **{"checkpoint.every_steps": 6, "data.source": "pydoc_data.topics",
                   "samples.num": 1, "samples.prompt_len": 8, "samples.gen_length": 8,
                   "samples.steps": 8})
  result = train.train_and_evaluate(cfg, workdir)
  out = capsys.readouterr().out
  assert "initialised from" in out and "sample: " in out, out
  assert np.isfinite(result["loss"]), result

  base = llada_jax.load(fixture_dir)
  tuned = llada_jax.load(workdir)
  assert tuned.config == base.config
  moved = np.abs(np.asarray(tuned.wte[...]) - np.asarray(base.wte[...])).max()
  assert 0 < moved < 0.1, moved  # trained a little, from the fixture's weights

  assert sample.main(["--checkpoint", workdir, "--prompt", "The", "--gen_length", "8",
                      "--steps", "8", "--block_length", "8"]) == 0
  assert capsys.readouterr().out.strip()


def _kill_at(step):
  """An `on_step` hook: SIGKILL this process once `step` has ended (fault injection)."""
  def on_step(done):
    if done == step:
      os.kill(os.getpid(), signal.SIGKILL)
  return on_step


if __name__ == "__main__":
  train.define_flags()
  flags.DEFINE_integer("kill_at_step", -1, "SIGKILL the run once this step has ended")
  app.run(lambda argv: train.main(argv, on_step=_kill_at(flags.FLAGS.kill_at_step)))


@pytest.mark.slow
def test_moe_training_from_the_fixture_logs_router_losses(token_data, tmp_path, capsys):
  """init_from a LLaDA-MoE snapshot: steps run, the router losses are logged apart,
  and the workdir loads as a LLaDA-MoE model again."""
  import shutil  # pylint: disable=g-import-not-at-top
  import llada_jax  # pylint: disable=g-import-not-at-top
  src = tmp_path / "moe"
  shutil.copytree(os.path.join(REPO, "tests", "fixtures", "lladamoe_tiny"), src)
  hf = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**hf, "mask_token_id": 483}))
  workdir = str(tmp_path / "ft")
  cfg = _config(init_from=str(src), total_steps=6, log_every=3,
                **{"data.source": token_data, "checkpoint.every_steps": 6,
                   "samples.num": 0})
  result = train.train_and_evaluate(cfg, workdir)
  out = capsys.readouterr().out
  assert "load_balancing_loss" in out and np.isfinite(result["loss"]), out
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(r["load_balancing_loss"] >= 1.0 - 1e-3 for r in rows), rows  # E·Σ f·P ≥ 1
  tuned = llada_jax.load(workdir)
  assert tuned.config.family == "llada_moe" and tuned.config.num_experts == 8
