"""Buckets: every path the project reads or writes may be gs://... (llada_jax/paths.py).

The path layer is checked on a local directory and on a GCS emulator
(tests/gcs_emulator.py, started and stopped here on a free loopback port);
the slow test runs the whole round on the emulator: convert the fixture into
the bucket, train with data, init_from and the workdir there, kill -9 and
resume, then load, export to safetensors in the bucket and load that, and
sample (prompts and completions in the bucket too).
"""

import json
import os
import signal

import numpy as np
import pytest

from llada_jax import paths

import gcs_emulator  # pylint: disable=g-bad-import-order
import test_train as train_test  # pylint: disable=g-bad-import-order  (its tiny run)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """gs://BUCKET/<fresh prefix> on an emulator that lives for this module."""
  log = str(tmp_path_factory.mktemp("emulator") / "emulator.log")
  with gcs_emulator.emulator(log):
    yield f"gs://{gcs_emulator.BUCKET}"


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return f"{request.getfixturevalue('bucket')}/{request.node.name.replace('[', '_')[:-1]}"


def test_files_round_trip(root):
  paths.makedirs(os.path.join(root, "d"))
  paths.write_text(os.path.join(root, "d", "a.txt"), "one")
  paths.write_text(os.path.join(root, "d", "a.txt"), "two")  # replaced whole
  with paths.open(os.path.join(root, "d", "b.bin"), "wb") as f:
    f.write(b"0123456789")
  assert paths.read_text(os.path.join(root, "d", "a.txt")) == "two"
  assert sorted(paths.listdir(os.path.join(root, "d"))) == ["a.txt", "b.bin"]
  assert paths.isdir(os.path.join(root, "d")) and paths.isfile(os.path.join(root, "d", "a.txt"))
  assert not paths.exists(os.path.join(root, "nothing"))
  assert paths.getsize(os.path.join(root, "d", "b.bin")) == 10
  with paths.open(os.path.join(root, "d", "b.bin"), "rb") as f:  # a ranged read
    f.seek(3)
    buf = bytearray(4)
    assert f.readinto(buf) == 4 and bytes(buf) == b"3456"
  assert paths.glob(os.path.join(root, "d", "*.txt")) == [os.path.join(root, "d", "a.txt")]
  with pytest.raises(FileNotFoundError):
    paths.listdir(os.path.join(root, "nothing"))


def test_exclusive_create_and_append(root):
  lock = os.path.join(root, "lock")
  assert paths.create_exclusive(lock, "me")
  assert not paths.create_exclusive(lock, "you")
  assert paths.read_text(lock) == "me"
  log = os.path.join(root, "metrics.jsonl")
  for rows in (["1\n", "2\n"], ["3\n"]):  # a run, then a resumed one
    f = paths.AppendFile(log)
    for row in rows:
      f.write(row)
      f.flush()
    f.close()
  assert paths.read_text(log) == "1\n2\n3\n"


def test_tree_moves_and_local_copy(root):
  src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
  for name in ("config.json", "params/x", "params/sub/y"):
    paths.makedirs(os.path.dirname(os.path.join(src, name)))
    paths.write_text(os.path.join(src, name), name)
  paths.rename_tree(src, dst, last=("config.json",))
  assert paths.walk_files(dst) == ["config.json", "params/sub/y", "params/x"]
  assert not paths.exists(src)
  with paths.local_copy(dst, ("config.json", "absent.json")) as local:
    assert paths.read_text(os.path.join(local, "config.json")) == "config.json"
    assert local == dst if not paths.is_remote(dst) else os.listdir(local) == ["config.json"]
  paths.rmtree(dst)
  assert not paths.exists(dst)


def test_unfinished_steps_in_a_bucket_are_not_steps(bucket):
  """Orbax writes a step in place on GCS and marks it finished last."""
  from llada_jax.checkpoints import layout  # pylint: disable=g-import-not-at-top
  ckpts = f"{bucket}/steps/checkpoints"
  paths.write_text(f"{ckpts}/2/params/_METADATA", "{}")  # being written
  paths.write_text(f"{ckpts}/4/{layout.COMMIT_SUCCESS}", "")
  assert layout.step_dirs(ckpts) == [f"{ckpts}/4"]


def test_url_forms():
  assert paths.is_remote("gs://b/x") and not paths.is_remote("/x") and not paths.is_remote("x")
  assert paths.absolute("gs://b/x/") == "gs://b/x"
  assert paths.absolute("x") == os.path.abspath("x")
  with pytest.raises(ValueError, match="cannot append"):
    paths.open("gs://b/x", "a")


@pytest.mark.slow
def test_convert_train_kill_resume_load_sample_in_a_bucket(bucket, fixture_dir, tmp_path,
                                                           capsys):
  import llada_jax  # pylint: disable=g-import-not-at-top
  from llada_jax.convert import hf_to_orbax, orbax_to_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.frontends import cli as sample  # pylint: disable=g-import-not-at-top
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

  converted, workdir = f"{bucket}/llada_tiny", f"{bucket}/run"
  hf_to_orbax.convert(fixture_dir, converted, progress=False)
  assert "config.json" in paths.listdir(converted)
  text = "\n\n".join(topics[k] for k in sorted(topics)[:40])
  paths.write_text(f"{bucket}/data/docs.txt", text)

  changes = {"init_from": converted, "data.source": f"{bucket}/data/*.txt", "total_steps": 6,
             "seq_len": 32, "log_every": 2, "checkpoint.every_steps": 2, "samples.num": 0}
  rc, out = train_test._run(workdir, changes, kill_at_step=5)  # pylint: disable=protected-access
  assert rc == -signal.SIGKILL, out
  assert "initialised from gs://" in out, out
  rc, out = train_test._run(workdir, changes)  # pylint: disable=protected-access
  assert rc == 0, out
  assert "removing the stale lock" in out, out  # the killed run's, in the bucket
  assert "resumed from step 4" in out or "resumed from step 2" in out, out  # (async saves)
  rows = [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == [2, 4, 6]  # step 5's run-ahead rows trimmed
  assert not paths.exists(f"{workdir}/.lock")
  assert paths.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
  assert {"config.json", "train_config.json", "tokenizer.json"} <= set(paths.listdir(workdir))

  tuned, base = llada_jax.load(workdir), llada_jax.load(fixture_dir)
  assert tuned.config == base.config
  moved = np.abs(np.asarray(tuned.wte[...]) - np.asarray(base.wte[...])).max()
  assert 0 < moved < 0.1, moved
  exported = f"{bucket}/llada_tiny_tuned_hf"  # safetensors written to, then read from, the bucket
  orbax_to_hf.convert(workdir, exported, progress=False)
  ids = np.arange(1, 17)[None]
  np.testing.assert_array_equal(np.asarray(llada_jax.load(exported)(ids)),
                                np.asarray(tuned(ids)))
  prompts, completions = f"{bucket}/prompts.jsonl", f"{bucket}/out/completions.jsonl"
  paths.write_text(prompts, "".join(json.dumps({"prompt": p}) + "\n" for p in ("The", "A")))
  assert sample.main(["--checkpoint", workdir, "--input", prompts, "--output", completions,
                      "--gen_length", "8", "--steps", "8", "--block_length", "8"]) == 0
  lines = [json.loads(line) for line in paths.read_text(completions).splitlines()]
  assert [r["prompt"] for r in lines] == ["The", "A"] and all("completion" in r for r in lines)
  capsys.readouterr()


def test_evaluate_output_path_in_a_bucket(bucket, tmp_path):
  """lm-eval writes with pathlib, so a gs:// --output_path reaches it as the same
  name in a temp directory, whose files go up next to the URL when it returns."""
  evaluate = pytest.importorskip("llada_jax.frontends.evaluate")
  url = f"{bucket}/evals/run1"
  argv = ["--tasks", "t", "-o", url, "--log_samples"]
  with evaluate.local_output(url) as local:
    assert not paths.is_remote(local) and os.path.basename(local) == "run1"
    assert evaluate.with_output_path(argv, local) == ["--tasks", "t", "-o", local,
                                                      "--log_samples"]
    assert evaluate.with_output_path([f"--output_path={url}"], local) == [
        f"--output_path={local}"]
    os.makedirs(os.path.join(local, "llada_jax"))  # as lm-eval's EvaluationTracker writes
    for name in ("results_1.json", "samples_t_1.jsonl"):
      with open(os.path.join(local, "llada_jax", name), "w", encoding="utf-8") as f:
        f.write(name)
  assert paths.walk_files(url) == ["llada_jax/results_1.json", "llada_jax/samples_t_1.jsonl"]
  assert paths.read_text(f"{url}/llada_jax/results_1.json") == "results_1.json"
  with evaluate.local_output(f"{bucket}/evals/r.json") as local:  # a results file name:
    paths.write_text(os.path.join(os.path.dirname(local), "r_1.json"), "{}")  # dated siblings
  assert paths.read_text(f"{bucket}/evals/r_1.json") == "{}"
  for path in (None, str(tmp_path / "out")):  # local: lm-eval writes there itself
    with evaluate.local_output(path) as local:
      assert local == path


@pytest.mark.slow
def test_evaluate_command_line_writes_results_and_samples_to_a_bucket(bucket, fixture_dir,
                                                                      tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  evaluate_test = pytest.importorskip("test_evaluate")
  evaluate_test._write_tasks(tmp_path)  # pylint: disable=protected-access
  args = ",".join(f"{k}={v}" for k, v in {"checkpoint": fixture_dir,
                                          **evaluate_test.SMALL}.items())
  url = f"{bucket}/evals_cli"  # the bucket is shared by the module's tests
  cmd = [sys.executable, "-m", "llada_jax.evaluate", "--model", "llada_jax", "--model_args",
         args, "--tasks", "tiny_gen", "--include_path", str(tmp_path), "--batch_size", "4",
         "--limit", "2", "--output_path", url, "--log_samples"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(evaluate_test.REPO)}
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  names = paths.walk_files(url)
  assert [n.split("/")[-1].split("_")[0] for n in names] == ["results", "samples"], names
  [results] = [n for n in names if n.split("/")[-1].startswith("results")]
  assert "tiny_gen" in json.loads(paths.read_text(f"{url}/{results}"))["results"]


def test_token_records_in_a_bucket(bucket, tmp_path):
  """ArrayRecord's reader opens local files only: bucket files are read from copies."""
  from llada_jax.training import data  # pylint: disable=g-import-not-at-top
  for name, docs_ids in (("a", [[5, 6, 7], [8]]), ("b", [[9, 10]])):
    data.write_token_records(str(tmp_path / f"{name}.array_record"), docs_ids)
    paths.copyfile(str(tmp_path / f"{name}.array_record"),
                   f"{bucket}/records/{name}.array_record")
  docs = data.documents(f"{bucket}/records/*.array_record")
  assert [docs[i]["ids"].tolist() for i in range(len(docs))] == [[5, 6, 7], [8], [9, 10]]
