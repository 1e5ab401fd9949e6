"""The sampling command line: one prompt, and JSONL batch mode with bad lines."""

import json

import numpy as np
import pytest

import llada_jax
from llada_jax.frontends import cli as sample
from llada_jax.tokenizer import load_tokenizer

FLAGS = ["--steps", "8", "--gen_length", "8", "--block_length", "4"]


def test_single_prompt(tiny_model, fixture_dir, capsys):
  assert sample.main(["--checkpoint", fixture_dir, "--prompt", "def f(x):", "--chat"]
                     + FLAGS) == 0
  printed = capsys.readouterr().out
  tok = load_tokenizer(fixture_dir)
  ids = tok.apply_chat_template([{"role": "user", "content": "def f(x):"}])
  out = llada_jax.generate(tiny_model, np.asarray(ids), steps=8, gen_length=8, block_length=4)
  assert printed == tok.decode(np.asarray(out)[len(ids):]) + "\n"


def test_fast_sampling_flags(tiny_model, fixture_dir, capsys):
  fast = ["--cache", "dual", "--threshold", "0.5", "--stop_at_eos"]
  assert sample.main(["--checkpoint", fixture_dir, "--prompt", "def f(x):"] + FLAGS + fast) == 0
  tok = load_tokenizer(fixture_dir)
  ids = tok.encode("def f(x):")
  out = llada_jax.generate(tiny_model, np.asarray(ids), steps=8, gen_length=8, block_length=4,
                           cache="dual", threshold=0.5, stop_at_eos=True)
  assert capsys.readouterr().out == tok.decode(np.asarray(out)[len(ids):]) + "\n"


def test_batch_mode_keeps_order_and_skips_bad_lines(tiny_model, fixture_dir, tmp_path, capsys):
  lines = [
      json.dumps({"prompt": "import os", "id": 0}),
      "{not json",
      json.dumps({"prompt": "The quick brown fox jumps over", "id": 1}),
      json.dumps({"messages": [{"role": "user", "content": "hello"}], "id": 2}),
      json.dumps({"text": "no prompt"}),
      json.dumps({"prompt": "x", "steps": 3}),  # 3 is not a multiple of 2 blocks
      json.dumps({"prompt": "for i in range(10):", "id": 3, "temperature": 0.8}),
      "",
      json.dumps({"prompt": "class A:", "id": 4}),
  ]
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("\n".join(lines) + "\n")
  assert sample.main(["--checkpoint", fixture_dir, "--input", str(src), "--output", str(dst),
                      "--batch_size", "2"] + FLAGS) == 0
  err = capsys.readouterr().err
  for line_no in (2, 5, 6):
    assert f"in.jsonl:{line_no}: skipped" in err
  assert "steps" in err
  records = [json.loads(l) for l in dst.read_text().splitlines()]
  assert [r["id"] for r in records] == [0, 1, 2, 3, 4]
  assert all(isinstance(r["completion"], str) for r in records)
  assert records[3]["temperature"] == 0.8
  # Greedy completions equal generate on the prompt alone (left padding is masked).
  tok = load_tokenizer(fixture_dir)
  for r in (records[0], records[1], records[4]):
    ids = tok.encode(r["prompt"])
    out = llada_jax.generate(tiny_model, np.asarray(ids), steps=8, gen_length=8,
                             block_length=4)
    assert r["completion"] == tok.decode(np.asarray(out)[len(ids):])


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a", "--input", "x"], "exactly one"),
    (["--input", "missing.jsonl", "--output", "o.jsonl"], "--input"),
    (["--prompt", "a", "--gen_length", "10", "--block_length", "4"], "block_length"),
    (["--prompt", "a", "--steps", "0"], "steps"),
    (["--prompt", "a", "--threshold", "0.9", "--remasking", "random"], "threshold"),
    (["--prompt", "a", "--cache_refresh", "0"], "cache_refresh"),
])
def test_bad_flags_fail_before_loading(fixture_dir, capsys, argv, message):
  with pytest.raises(SystemExit):
    sample.main(["--checkpoint", fixture_dir] + argv)
  assert message in capsys.readouterr().err
