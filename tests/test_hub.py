"""Hub ids as model directories, offline, against a Hub cache filled from the tiny fixture."""

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import llada_jax
from llada_jax.checkpoints import hub
from llada_jax.frontends import cli as sample
from llada_jax.frontends import settings
from llada_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO_ID = "someone/llada-tiny"


def fill_cache(hub_cache: pathlib.Path, repo_id: str, src: str, ref: str = "main") -> str:
  """Writes `src`'s model files as huggingface_hub caches a download: blobs named by
  their hash, snapshots/<commit>/ linking to them, refs/<ref> naming the commit."""
  repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
  files = sorted(p for p in pathlib.Path(src).iterdir() if not p.name.startswith("reference"))
  digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
  commit = hashlib.sha1("".join(f"{n}{d}" for n, d in digests.items()).encode()).hexdigest()
  (repo / "blobs").mkdir(parents=True)
  (repo / "snapshots" / commit).mkdir(parents=True)
  for p in files:
    (repo / "blobs" / digests[p.name]).write_bytes(p.read_bytes())
    os.symlink(f"../../blobs/{digests[p.name]}", repo / "snapshots" / commit / p.name)
  (repo / "refs").mkdir()
  (repo / "refs" / ref).write_text(commit)
  return commit


@pytest.fixture
def offline_cache(fixture_dir, tmp_path, monkeypatch):
  """HF_HOME = a tmp dir whose hub cache holds someone/llada-tiny; HF_HUB_OFFLINE=1."""
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return fill_cache(tmp_path / "hf" / "hub", REPO_ID, fixture_dir)


def test_parse_hub_id():
  assert hub.parse_hub_id("GSAI-ML/LLaDA-8B-Instruct") == ("GSAI-ML/LLaDA-8B-Instruct", None)
  assert hub.parse_hub_id("a/b@v1.0") == ("a/b", "v1.0")
  assert hub.parse_hub_id("a/b@refs/pr/3") == ("a/b", "refs/pr/3")
  for text in ("/abs/path", "./x/y", "a/b/c", "gs://bucket/x", "name", "a/b--c", "a/..b",
               "a/b@"):
    assert hub.parse_hub_id(text) is None, text


def test_directories_pass_and_bad_paths_are_named(fixture_dir):
  assert hub.resolve_model_dir(fixture_dir) == fixture_dir
  with pytest.raises(FileNotFoundError, match="/nonexistent/x is not a directory, nor a "
                     "Hugging Face Hub id"):
    hub.resolve_model_dir("/nonexistent/x")
  with pytest.raises(ValueError, match="is a local directory"):
    hub.resolve_model_dir(fixture_dir, revision="main")


def test_load_from_the_cache_offline(offline_cache, tiny_model, tmp_path):
  ids = np.arange(3, 19, dtype=np.int32)[None]
  want = np.asarray(tiny_model(ids))
  snapshot = tmp_path / "hf" / "hub" / "models--someone--llada-tiny" / "snapshots" / offline_cache
  assert hub.resolve_model_dir(REPO_ID) == str(snapshot)
  for kwargs in ({"path": REPO_ID}, {"path": f"{REPO_ID}@{offline_cache}"},
                 {"path": REPO_ID, "revision": "main"}):
    model = llada_jax.load(**kwargs)
    np.testing.assert_array_equal(np.asarray(model(ids)), want)
  with pytest.raises(ValueError, match="revision 'v2' differs from revision='main'"):
    hub.resolve_model_dir(f"{REPO_ID}@v2", revision="main")


def test_offline_and_not_cached_names_the_id_and_cache(offline_cache, tmp_path):
  for name in ("nobody/missing", f"{REPO_ID}@v2"):
    with pytest.raises(FileNotFoundError) as e:
      llada_jax.load(name)
    message = str(e.value)
    assert name in message and "not in the Hub cache" in message
    assert f"HF_HOME={tmp_path / 'hf'}" in message and "HF_HUB_OFFLINE is set" in message


def test_model_flags_take_hub_ids(offline_cache, fixture_dir):
  checkpoint, tokenizer = settings.model_paths(REPO_ID, REPO_ID)
  assert checkpoint == tokenizer and checkpoint.endswith(offline_cache)
  assert settings.model_paths(REPO_ID, fixture_dir)[1] == fixture_dir
  with pytest.raises(FileNotFoundError, match="^--checkpoint: nobody/missing is not a local"):
    settings.model_paths("nobody/missing")
  with pytest.raises(FileNotFoundError, match="^--tokenizer: nobody/missing is not a local"):
    settings.model_paths(REPO_ID, "nobody/missing")


def test_convert_takes_a_hub_id(offline_cache, tmp_path, capsys):
  from llada_jax.convert import hf_to_orbax  # pylint: disable=g-import-not-at-top
  out = tmp_path / "converted"
  assert hf_to_orbax.main(["--hf_dir", REPO_ID, "--output_dir", str(out), "--no_progress"]) == 0
  assert (out / "params").is_dir() and (out / "config.json").is_file()


def test_sample_cli_with_a_hub_id(offline_cache, tiny_model, fixture_dir, tmp_path,
                                   capsys):
  """`python -m llada_jax.sample --checkpoint owner/name`, in a fresh process (the
  environment as a user sets it), equals generate on the fixture directory."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
      [sys.executable, "-m", "llada_jax.sample", "--checkpoint", REPO_ID, "--prompt",
       "def f(x):", "--steps", "8", "--gen_length", "8", "--block_length", "4"],
      capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  tok = load_tokenizer(fixture_dir)
  ids = tok.encode("def f(x):")
  out = llada_jax.generate(tiny_model, np.asarray(ids), steps=8, gen_length=8, block_length=4)
  assert run.stdout == tok.decode(np.asarray(out)[len(ids):]) + "\n"
  with pytest.raises(SystemExit):  # before anything loads
    sample.main(["--checkpoint", "nobody/missing", "--prompt", "x"])
  assert "--checkpoint: nobody/missing is not a local" in capsys.readouterr().err
