"""Issue 17, one test per numbered case (case 1 and the converter parts of 2, 7
and 8 are in test_convert.py, load's in test_checkpoint.py, config.json's in
test_config.py): each asserts the message names the thing and that nothing
outside the output was touched. One short training run is shared."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

import llada_jax
from llada_jax import errors
from llada_jax import ownership
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import orbax as checkpoint
from llada_jax.training import data as data_lib
from llada_jax.training import lock
from llada_jax.training import train

import test_train as train_test  # pylint: disable=g-bad-import-order  (its tiny config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data, **changes):
  """test_train's tiny run: 8 steps, checkpoints every 4, no samples."""
  return train_test._config(**{"data.source": data, "total_steps": 8, "samples.num": 0,
                               **changes})


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
  rs = np.random.RandomState(0)
  docs = [[7 + (rs.randint(7, 120) + 2 * i) % 120 for i in range(20)] for _ in range(300)]
  path = str(tmp_path_factory.mktemp("data") / "docs.array_record")
  data_lib.write_token_records(path, docs)
  return path


@pytest.fixture(scope="module")
def base_workdir(token_data, tmp_path_factory):
  """8 steps of a tiny model, checkpoints at steps 1, 4 and 8 (copy before changing)."""
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  train.train_and_evaluate(_config(token_data), workdir)
  return workdir


def _copy(base, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(base, dst)
  return dst


def _files(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


# ---- case 2 and 7: invalid training configs, before any file --------------------------

@pytest.mark.parametrize("changes,needle", [
    ({"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate=nan: must be finite"),
    ({"optimizer.warmup_steps": 100, "optimizer.decay_steps": 300, "total_steps": 40},
     "config.optimizer.warmup_steps=100 + config.optimizer.decay_steps=300 exceed "
     "config.total_steps=40"),
    ({"batch_size": 12, "mesh.fsdp": -1},
     "config.batch_size=12: 12 rows per micro-batch do not divide over the mesh's batch axes "
     "(data=1 x fsdp=8 x expert=1 = 8)"),
    ({"micro_batches": 3}, "config.batch_size=8: does not divide into 1 host(s) x 3 micro-batches"),
    ({"optimizer.b2": 1.0}, "config.optimizer.b2=1.0: must be < 1"),
    ({"checkpoint.keep": 0}, "config.checkpoint.keep=0: must be >= 1"),
    ({"mesh.tensor": 3},
     "config.mesh=(data=1, fsdp=-1, expert=1, tensor=3): 8 devices do not divide by 3"),
    ({"mesh.dcn_data": 3}, "config.mesh=(data=1x3 slices, fsdp=-1, expert=1, tensor=1): 8 "
     "devices do not split into 3 slices"),
    ({"kind": "finetune"}, "config.kind='finetune': is not one of 'pretrain', 'sft'"),
    ({"kind": "block_pretrain", "block_length": 5},
     "config.block_length=5: does not divide config.seq_len=16"),
    ({"cap_weight": 0.5}, "config.cap_weight=0.5: CAP is an SFT loss"),
    ({"complementary_masking": True}, "config.complementary_masking=True: only the block kinds"),
])
def test_invalid_training_config_is_refused_before_any_file(token_data, tmp_path, changes,
                                                           needle):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_config(token_data, **changes), str(workdir))
  assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
  assert not workdir.exists() and os.listdir(tmp_path) == []


def test_unknown_config_flag_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "llada_jax.train", f"--config={REPO}/configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--config.foo=1"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "train: error: --config.foo: no such key in the config"
  assert not (tmp_path / "run").exists()


# ---- case 3: fall back past a broken checkpoint ----------------------------------------

def test_resume_and_load_fall_back_past_a_broken_checkpoint(base_workdir, token_data,
                                                            tmp_path, capsys, caplog):
  workdir = _copy(base_workdir, tmp_path)
  step8 = os.path.join(workdir, "checkpoints", "8")
  assert "param_digests" in layout.custom_metadata(step8)  # every save records them
  caplog.set_level(logging.WARNING, logger="absl")
  shutil.rmtree(os.path.join(step8, "params", "d"))  # lost its data files (flips: test_checkpoint)
  model = llada_jax.load(workdir)
  warned = [r.getMessage() for r in caplog.records if "broken checkpoint" in r.getMessage()]
  assert warned and f"{step8}: broken checkpoint (" in warned[0], warned
  assert "falling back to step 4" in warned[0]
  assert not [r for r in caplog.records if r.name == "absl"]  # case 8: no absl noise on load
  want = checkpoint.restore_params(os.path.join(workdir, "checkpoints", "4"),
                                  nnx.split(model)[1])
  np.testing.assert_array_equal(np.asarray(model.wte[...]), np.asarray(want["wte"]))

  # A stale lock (a trainer killed with -9) is taken over; the broken step is set aside.
  with open(os.path.join(workdir, lock.LOCK_FILE), "w") as f:
    json.dump({**ownership.this_owner(), "pid": 999999999, "start": 1}, f)
  capsys.readouterr()
  result = train.train_and_evaluate(_config(token_data), workdir)
  out, err = capsys.readouterr()
  assert "resumed from step 4" in out and result["step"] == 8
  assert f"{step8}: broken checkpoint" in err and "removing the stale lock of pid 999999999" in err
  assert glob.glob(os.path.join(workdir, "broken_checkpoints", "8-*", "params"))
  assert os.path.isdir(step8)  # saved again
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  logged = [s for s in range(1, 9) if s % _config(token_data).log_every == 0 or s == 8]
  assert steps == logged  # case 8: each logged step once after the resume
  assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))


# ---- case 4: a refused restart leaves the workdir as it was ----------------------------

@pytest.mark.parametrize("changes,needle", [
    ({"model.d_model": 64}, "its model (config.json) differs from this run's in d_model (32 -> 64)"),
    ({"model.n_layers": 3, "model.rope_theta": 500.0},
     "differs from this run's in n_layers (2 -> 3); rope_theta (10000.0 -> 500.0)"),
])
def test_a_differing_config_is_refused_and_writes_nothing(base_workdir, token_data, tmp_path,
                                                         changes, needle):
  workdir = _copy(base_workdir, tmp_path)
  before = _files(tmp_path)
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_config(token_data, **changes), workdir)
  assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
  assert _files(tmp_path) == before


# ---- case 6: one trainer per workdir ----------------------------------------------------

def test_a_second_trainer_is_stopped_by_the_lock(base_workdir, token_data, tmp_path):
  workdir = _copy(base_workdir, tmp_path)
  other = {**ownership.this_owner(), "pid": os.getppid(), "start": 0}  # alive, not us
  with open(os.path.join(workdir, lock.LOCK_FILE), "w") as f:
    json.dump(other, f)
  home = tmp_path / "home"
  home.mkdir()
  (home / "notes.txt").write_text("mine")
  before = _files(tmp_path)
  with pytest.raises(lock.WorkdirLockedError) as e:
    train.train_and_evaluate(_config(token_data), workdir)
  msg = str(e.value)
  assert f"another trainer holds it (pid {os.getppid()} on {other['host']}" in msg, msg
  assert os.path.join(workdir, lock.LOCK_FILE) in msg
  with pytest.raises(ValueError, match="holds notes.txt, which is not a training workdir"):
    train.train_and_evaluate(_config(token_data), str(home))
  assert _files(tmp_path) == before


# ---- case 5: a failed async checkpoint save stops training at once, in one line -------

def test_a_failed_async_save_surfaces_at_the_next_step(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from llada_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  mnt = tmp_path / "disk"
  mnt.mkdir()
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True,
                   capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {e}")
  try:
    mngr = workdir_lib.manager(str(mnt / "run"), every_steps=1, keep=2)
    w = jax.random.normal(jax.random.key(0), (512, 1024))  # random: Orbax compresses chunks
    state = {"params": {"w": w}, "opt_state": {"m": w + 1}}
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    assert workdir_lib.save(mngr, 1, state, iterator, {"step": 1})  # 4 MB onto 1 MB, async
    deadline, error = time.time() + 60, None
    while error is None and time.time() < deadline:
      try:
        mngr.should_save(2)  # what the loop asks after every step
      except Exception as e:  # pylint: disable=broad-except
        error = e
      time.sleep(0.05)
    assert error is not None
    message = errors.one_line(error)  # names the file when the failing write says which
    assert message.startswith("no space left on device writing") and "\n" not in message, message
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---- case 5 and 7: the sample CLI keeps its work; argument checks name the key ---------

SAMPLE_FLAGS = ["--steps", "8", "--gen_length", "8", "--block_length", "4"]


def _sample(fixture_dir, src, dst, *extra):
  from llada_jax.frontends import cli  # pylint: disable=g-import-not-at-top
  try:
    return cli.main(["--checkpoint", fixture_dir, "--input", str(src), "--output", str(dst),
                     "--batch_size", "1", *SAMPLE_FLAGS, *extra])
  except SystemExit as e:
    return e.code


def test_sample_cli_keeps_finished_completions_and_resumes(fixture_dir, tmp_path, capsys,
                                                           monkeypatch):
  from llada_jax.frontends import cli  # pylint: disable=g-import-not-at-top
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "import os", "id": 0}, {"prompt": "The fox", "id": 1},
      {"prompt": "x", "temperature": "hot"}, {"prompt": "class A:", "id": 2}]) + "\n")
  assert _sample(fixture_dir, src, tmp_path) == 2  # a directory: refused before loading
  assert f"--output: {tmp_path} is a directory" in capsys.readouterr().err

  real, calls = cli.generate_batch, []

  def crash_on_the_second_batch(*args):
    calls.append(args[2][0].record["id"])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args)
  monkeypatch.setattr(cli, "generate_batch", crash_on_the_second_batch)
  assert _sample(fixture_dir, src, dst) == 130
  err = capsys.readouterr().err
  assert "in.jsonl:3: skipped: temperature: expected a finite number >= 0, got 'hot'" in err
  assert not dst.exists() and len((tmp_path / "out.jsonl.partial").read_text().splitlines()) == 1
  assert _sample(fixture_dir, src, dst) == 2  # would throw the finished one away
  assert "pass --resume to continue it" in capsys.readouterr().err
  monkeypatch.setattr(cli, "generate_batch", real)
  assert _sample(fixture_dir, src, dst, "--resume") == 0
  assert "wrote 3 completions" in capsys.readouterr().err
  records = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [r["id"] for r in records] == [0, 1, 2] and all("completion" in r for r in records)
  assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]

  def full_disk(self, key, record):
    raise OSError(28, "No space left on device", self.partial)
  monkeypatch.setattr(cli.completions.CompletionFile, "_append", full_disk)
  dst.unlink()
  assert _sample(fixture_dir, src, dst) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("python -m llada_jax.sample: error: no space left on device writing "
                     f"{dst}.partial"), err


def test_generate_refuses_a_non_bool_flag(tiny_model):
  with pytest.raises(ValueError, match="logits_eos_inf: expected True or False, got 'no'"):
    llada_jax.generate(tiny_model, np.asarray([5, 6, 7]), steps=4, gen_length=4,
                       block_length=4, logits_eos_inf="no")


def test_web_demo_too_long_message_names_its_buttons(tiny_model, fixture_dir):
  """Case 8: web users have a Reset button and a gen_length slider, not /reset."""
  import gradio as gr  # pylint: disable=g-import-not-at-top
  from llada_jax.frontends import app  # pylint: disable=g-import-not-at-top
  from llada_jax.frontends import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from llada_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  settings = {**{k: v for k, v in settings_lib.SAMPLER_ARGS.items()}, "seed": 0}
  demo = app.build(tiny_model, load_tokenizer(fixture_dir), settings)
  respond = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "respond")
  with pytest.raises(gr.Error) as e:
    list(respond("word " * 600, [], [], 0, 8, 8, 8, 0.0, 0.0, "low_confidence", ""))
  assert "too long" in e.value.message and "Press Reset" in e.value.message
  assert "/reset" not in e.value.message and "/set" not in e.value.message
