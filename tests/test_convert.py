"""The converters end to end: round trips, dtypes, and every refusal."""

import json
import logging
import os
import pathlib
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llada_jax
import llada_jax.ownership
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import orbax as checkpoint
from llada_jax.convert import hf_to_orbax, orbax_to_hf

PREFIX = "model.transformer."
REFERENCE_CONFIG = pathlib.Path(__file__).parent / "fixtures" / "llada_8b_instruct" / "config.json"


def _tensors(model_dir):
  model_dir = pathlib.Path(model_dir)
  out = {}
  for fname in sorted(os.listdir(model_dir)):
    if fname.endswith(".safetensors"):
      out.update(load_file(model_dir / fname))
  return out


def _snapshot(fixture_dir, tmp_path, edit=None, dtype=None, name="src"):
  """The fixture re-saved as two shards + index (optionally cast / edited)."""
  tensors = _tensors(fixture_dir)
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  if edit:
    edit(tensors)
  out = tmp_path / name
  out.mkdir()
  for fname in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(pathlib.Path(fixture_dir) / fname, out / fname)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, part in shards.items():
    save_file({k: tensors[k] for k in part}, out / fname)
  index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
  (out / hf_checkpoint.INDEX_FILE).write_text(json.dumps(index))
  return str(out)


def _run(main, args, capsys, out=None):
  """rc and stderr of a converter's main; its stdout (the summary) into `out`."""
  rc = main([*args, "--no_progress"])
  captured = capsys.readouterr()
  if out is not None:
    out.append(captured.out)
  return rc, captured.err.strip()


def _leftovers(out):
  parent = pathlib.Path(out).parent
  return [p.name for p in parent.iterdir() if p.name.startswith(f".{pathlib.Path(out).name}.")]


def _assert_refused(rc, err, out, *needles):
  assert rc != 0
  assert len(err.splitlines()) == 1, err
  for needle in needles:
    assert needle in err, err
  assert not os.path.exists(out) or not os.listdir(out)
  assert not _leftovers(out)


def test_round_trip_is_bit_identical(fixture_dir, tmp_path, reference, capsys):
  orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
  summary = []
  rc, _ = _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(orbax_dir)],
               capsys, summary)
  assert rc == 0
  assert "217,408 parameters in 21 tensors" in summary[0] and "peak RSS" in summary[0]
  model = llada_jax.load(str(orbax_dir))
  np.testing.assert_allclose(np.asarray(model(reference["logits_input_ids"])),
                             reference["logits"], atol=1e-4, rtol=0)
  rc, _ = _run(orbax_to_hf.main, ["--checkpoint", str(orbax_dir), "--output_dir", str(hf_dir),
                                  "--max_shard_size", "300KB"], capsys)
  assert rc == 0
  index = json.loads((hf_dir / hf_checkpoint.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) == 4  # 849 KiB in shards of <= 300 KB
  for fname in set(index["weight_map"].values()):
    assert os.path.getsize(hf_dir / fname) < 300_000 + 4096  # tensor bytes + header
  want, got = _tensors(fixture_dir), _tensors(hf_dir)
  assert sorted(got) == sorted(want) == sorted(index["weight_map"])
  for name, w in want.items():
    assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  src = json.loads((pathlib.Path(fixture_dir) / "config.json").read_text())
  back = json.loads((hf_dir / "config.json").read_text())
  assert {k: v for k, v in back.items() if k != "eot_token_id"} == src  # eot id from tokenizer
  assert sorted(os.listdir(hf_dir)) == sorted(
      [*set(index["weight_map"].values()), hf_checkpoint.INDEX_FILE, "config.json",
       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])


def test_exported_config_has_the_released_keys(tmp_path):
  released = json.loads(REFERENCE_CONFIG.read_text())
  src = tmp_path / "released"
  src.mkdir()
  shutil.copy(REFERENCE_CONFIG, src / "config.json")
  cfg = llada_jax.ModelConfig.from_hf(released)
  layout.write_config(str(tmp_path), cfg, "bfloat16", str(src))
  ours = json.loads((tmp_path / "config.json").read_text())
  assert {k: ours[k] for k in released} == released
  assert set(ours) - set(released) <= {"bos_token_id", "eot_token_id"}  # ids SPEC §2 adds
  # A model trained here (no source config) still writes every released key.
  assert set(released) - set(cfg.to_hf()) <= {"_name_or_path"}


@pytest.mark.parametrize("target", [None, "float32", "bfloat16"])
def test_bfloat16_source_to_each_dtype(fixture_dir, tmp_path, target, capsys):
  src = _snapshot(fixture_dir, tmp_path, dtype=ml_dtypes.bfloat16)
  out = tmp_path / "orbax"
  args = ["--hf_dir", src, "--output_dir", str(out)] + (["--dtype", target] if target else [])
  assert _run(hf_to_orbax.main, args, capsys)[0] == 0
  params = checkpoint.OrbaxParams(str(out))
  stored = target or "bfloat16"  # default: the source's dtype
  assert params.source_dtype() == stored
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == stored
  source = _tensors(src)
  q0 = source[PREFIX + "blocks.0.q_proj.weight"]
  np.testing.assert_array_equal(params["blocks/q_proj"][0].reshape(64, -1).T,
                                q0.astype(stored))  # exact: bf16 -> f32 is lossless
  hf = tmp_path / "hf"
  assert _run(orbax_to_hf.main, ["--checkpoint", str(out), "--output_dir", str(hf),
                                 "--dtype", "bfloat16"], capsys)[0] == 0
  back = load_file(hf / hf_checkpoint.SINGLE_FILE)  # 425 KiB: one shard, no index
  assert not (hf / hf_checkpoint.INDEX_FILE).exists()
  for name, w in source.items():
    assert back[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back[name], w, err_msg=name)


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop(PREFIX + "blocks.1.up_proj.weight"), "missing tensor model.transformer.blocks.1.up_proj"),
    (lambda t: t.update({PREFIX + "blocks.2.up_proj.weight": np.zeros((160, 64), np.float32)}),
     "unexpected tensor model.transformer.blocks.2.up_proj"),
    (lambda t: t.update({PREFIX + "blocks.0.k_proj.weight": np.zeros((64, 64), np.float32)}),
     "blocks.0.k_proj.weight has shape (64, 64), config.json implies (32, 64)"),
])
def test_bad_tensors_are_refused(fixture_dir, tmp_path, edit, needle, capsys):
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", _snapshot(fixture_dir, tmp_path, edit),
                                    "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, needle)


def test_nonfinite_tensors_are_refused_unless_allowed(fixture_dir, tmp_path, capsys):
  """Case 2 of issue 17: a NaN in a safetensors file is named at conversion and load."""
  name = PREFIX + "blocks.1.q_proj.weight"

  def poison(t):
    t[name] = t[name].copy()
    t[name][2, 7] = np.nan
  src = _snapshot(fixture_dir, tmp_path, poison)
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", src, "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, f"tensor {name} has non-finite values (1 of 4096",
                  "model-0000", "--allow_nonfinite")
  with pytest.raises(ValueError, match=f"tensor {name} has non-finite values"):
    llada_jax.load(src)
  assert _run(hf_to_orbax.main, ["--hf_dir", src, "--output_dir", str(out),
                                 "--allow_nonfinite"], capsys)[0] == 0
  hf = tmp_path / "hf"
  rc, err = _run(orbax_to_hf.main, ["--checkpoint", str(out), "--output_dir", str(hf)], capsys)
  _assert_refused(rc, err, hf, "parameter blocks/q_proj has non-finite values",
                  "--allow_nonfinite")


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-100])


def _corrupt_header(path):
  data = bytearray(path.read_bytes())
  data[8:20] = b"not json at!"
  path.write_bytes(bytes(data))


def _drop_a_dtype(path):
  data = path.read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  del header[sorted(k for k in header if k != "__metadata__")[0]]["dtype"]
  raw = json.dumps(header, separators=(",", ":")).encode()
  path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


@pytest.mark.parametrize("damage,needle", [
    (_truncate, "truncated"), (_corrupt_header, "header is not JSON"),
    (_drop_a_dtype, "header entry has no 'dtype'"),
    (lambda p: p.unlink(), "names shard model-00002-of-00002.safetensors, which does not exist"),
])
def test_damaged_snapshot_is_refused(fixture_dir, tmp_path, damage, needle, capsys):
  src = pathlib.Path(_snapshot(fixture_dir, tmp_path))
  damage(src / "model-00002-of-00002.safetensors")
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, needle, "model-00002-of-00002.safetensors")


def test_non_llada_config_is_refused(fixture_dir, tmp_path, capsys):
  src = pathlib.Path(_snapshot(fixture_dir, tmp_path))
  cfg = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, f"{src}/config.json: model_type is 'llama', expected 'llada'")


def _files(root, skip=None):
  """{relative path: (size, mtime)} of every file under `root` (but `skip`)."""
  out = {}
  for dirpath, _, names in os.walk(root):
    if skip and (dirpath + os.sep).startswith(str(skip) + os.sep):
      continue
    for name in names:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


def test_existing_checkpoint_needs_overwrite(fixture_dir, tmp_path, capsys):
  out = tmp_path / "out"
  assert _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out)], capsys)[0] == 0
  before = sorted(os.listdir(out))
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out)], capsys)
  assert rc == 1 and "already holds files" in err and "--overwrite" in err
  assert sorted(os.listdir(out)) == before and not _leftovers(out)
  # A checkpoint of ours is replaced (atomically: renamed over, nothing left beside it).
  stamp = os.stat(out / "params").st_ino
  assert _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out),
                                 "--overwrite"], capsys)[0] == 0
  assert sorted(os.listdir(out)) == before and not _leftovers(out)
  assert os.stat(out / "params").st_ino != stamp
  empty = tmp_path / "empty"
  empty.mkdir()  # an empty directory is no checkpoint: filled without --overwrite
  assert _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(empty)], capsys)[0] == 0


def test_overwrite_never_deletes_the_input_or_other_files(fixture_dir, tmp_path, capsys):
  """Case 1 of issue 17: --overwrite onto the input, a directory above it, or a
  directory holding anything but our checkpoint is refused, naming it."""
  (tmp_path / "a" / "b").mkdir(parents=True)
  src = pathlib.Path(_snapshot(fixture_dir, tmp_path / "a" / "b", name="hf"))
  orbax_dir = tmp_path / "conv"
  assert _run(hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(orbax_dir)],
              capsys)[0] == 0
  (orbax_dir / "notes.txt").write_text("mine")  # our checkpoint plus a file of the user's
  home = tmp_path / "home"
  (home / "data").mkdir(parents=True)
  (home / "data" / "x.bin").write_bytes(b"precious")
  before = _files(tmp_path)
  cases = [
      (hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(src)], "is the input"),
      (hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(tmp_path / "a")],
       "contains the input"),
      (orbax_to_hf.main, ["--checkpoint", str(orbax_dir), "--output_dir", str(orbax_dir)],
       "is the input"),
      (hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(home)], "holds data"),
      (orbax_to_hf.main, ["--checkpoint", str(orbax_dir), "--output_dir", str(src.parent)],
       "holds hf, which is not a checkpoint"),
      (hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(orbax_dir)], "notes.txt"),
  ]
  for main, args, needle in cases:
    rc, err = _run(main, [*args, "--overwrite"], capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and needle in err, (args, err)
  assert _files(tmp_path) == before  # not one file touched


def test_leftovers_of_a_killed_conversion_are_removed(fixture_dir, tmp_path, capsys):
  out = tmp_path / "out"
  host = llada_jax.ownership.tag().rsplit("-", 1)[0]
  stale = tmp_path / f".out.partial-{host}-999999999-abcd1234"  # no such pid
  stale.mkdir()
  (stale / "big").write_bytes(b"x" * 1000)
  live = tmp_path / f".out.partial-{llada_jax.ownership.tag()}-live0000"  # our own pid: running
  live.mkdir()
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out)], capsys)
  assert rc == 0
  assert not stale.exists() and live.exists()
  assert str(live) in err and "left by another conversion" in err


def test_interrupted_conversion_leaves_nothing(fixture_dir, tmp_path, monkeypatch, capsys):
  writes = []
  real_write = checkpoint.ParamWriter.write

  def write_then_interrupt(self, path, array):
    real_write(self, path, array)  # a few parameters really reach the disk first
    writes.append(path)
    if len(writes) == 3:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint.ParamWriter, "write", write_then_interrupt)
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out)], capsys)
  assert rc == 130 and "interrupted" in err
  assert not out.exists() and not _leftovers(out)


@pytest.mark.parametrize("size", ["400k", "700k"])  # full before / during Orbax's writes
def test_full_disk_is_reported_and_leaves_nothing(fixture_dir, tmp_path, capsys, caplog, size):
  mnt = tmp_path / "small_disk"
  mnt.mkdir()
  caplog.set_level(logging.WARNING, logger="absl")  # Orbax logs its thread errors here
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {e}")
  try:
    out = mnt / "out"
    rc, err = _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(out)], capsys)
    _assert_refused(rc, err, out, "no space left on device", str(mnt))
    assert os.listdir(mnt) == []
    assert not [r for r in caplog.records if r.name == "absl"]  # no tracebacks before the line
  finally:
    subprocess.run(["umount", str(mnt)], check=False)


def test_orbax_to_hf_refusals(fixture_dir, tmp_path, capsys):
  out = tmp_path / "out"
  rc, err = _run(orbax_to_hf.main, ["--checkpoint", fixture_dir, "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, "holds no Orbax checkpoint")
  orbax_dir = tmp_path / "orbax"
  assert _run(hf_to_orbax.main, ["--hf_dir", fixture_dir, "--output_dir", str(orbax_dir)],
              capsys)[0] == 0
  rc, err = _run(orbax_to_hf.main, ["--checkpoint", str(orbax_dir), "--output_dir", str(out),
                                    "--max_shard_size", "lots"], capsys)
  _assert_refused(rc, err, out, "max_shard_size: 'lots'")
  cfg = json.loads((orbax_dir / "config.json").read_text())
  (orbax_dir / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
  rc, err = _run(orbax_to_hf.main, ["--checkpoint", str(orbax_dir), "--output_dir", str(out)],
                 capsys)
  _assert_refused(rc, err, out, "parameter blocks/attn_norm has shape (2, 64)",
                  "config.json implies (3, 64)")


def test_torch_bin_snapshot_needs_torch(fixture_dir, tmp_path, capsys):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed; the guard only applies without it")
  except ImportError:
    pass
  src = tmp_path / "bin_snapshot"
  src.mkdir()
  shutil.copy(pathlib.Path(fixture_dir) / "config.json", src / "config.json")
  (src / hf_checkpoint.BIN_SINGLE_FILE).write_bytes(b"PK\x03\x04 not read without torch")
  out = tmp_path / "out"
  rc, err = _run(hf_to_orbax.main, ["--hf_dir", str(src), "--output_dir", str(out)], capsys)
  _assert_refused(rc, err, out, "PyTorch .bin weights", "needs torch",
                  "pip install 'llada_jax[torch]'")
