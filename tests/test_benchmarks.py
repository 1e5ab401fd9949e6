"""The benchmark scripts run end to end (tiny sizes; their numbers are not asserted)."""

import json

from benchmarks import common
from benchmarks import forward
from configs import tiny
from llada_jax.config import ModelConfig


def test_forward_benchmark_reports_throughput():
  cfg = ModelConfig.from_dict(tiny.model_config())
  result = forward.run(cfg, batch=2, seq_len=32, repeats=1)
  seconds = result["seconds_per_forward"]
  assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"]
  assert result["tokens_per_s"]["median"] == 64 / seconds["median"]
  assert result["matmul_flops_per_s_float32"] > 0
  assert result["model_flops_per_s"]["max"] == cfg.forward_flops_per_token(32) * 64 / seconds[
      "min"]
  assert "load_average_start" in result["machine"]


def test_sampling_benchmark_runs_both_samplers():
  from benchmarks import sampling  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_dict(tiny.model_config())
  result = sampling.run(cfg, batches=[2], gen_lengths=[8], block_length=4, prompt_len=4,
                        repeats=1)
  (r,) = result["results"]
  assert r["same_tokens"]  # the reference-style loop and the compiled sampler agree
  assert r["loop_tokens_per_s"]["min"] > 0 and r["compiled_tokens_per_s"]["min"] > 0
  assert r["speedup"] == r["loop_seconds"]["median"] / r["compiled_seconds"]["median"]


def test_fast_sampling_task_is_split_by_construction(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from benchmarks import fast_sampling  # pylint: disable=g-import-not-at-top
  paths = fast_sampling.make_task(str(tmp_path), num_train=500, num_test=50)
  split = {name: [json.loads(l) for l in open(paths[name])] for name in ("train", "test")}
  assert len(split["train"]) == 500 and len(split["test"]) == 50
  assert all(fast_sampling.is_test(r["prompt"]) for r in split["test"])
  assert not any(fast_sampling.is_test(r["prompt"]) for r in split["train"])
  assert all(r["response"] == "".join(sorted(r["prompt"])) for r in split["test"])
  tok = fast_sampling.tokenizer_lib.load_tokenizer(paths["tokenizer"])
  assert tok.encode("0123") == [tok.encode(d)[0] for d in "0123"]  # one token per digit


def test_fast_sampling_ratios_use_the_median_rates():
  from benchmarks import fast_sampling
  rate = lambda median: {"tokens_per_s": {"min": median / 2, "median": median, "max": 2 * median}}
  rows = fast_sampling.add_ratios([
      {"accuracy": 0.5, "batch1": rate(10.0), "batch8": rate(40.0)},
      {"accuracy": 0.75, "batch1": rate(30.0), "batch8": rate(200.0)}])
  assert [r["speedup_batch1"] for r in rows] == [1.0, 3.0]
  assert [r["speedup_batch8"] for r in rows] == [1.0, 5.0]
  assert [r["accuracy_change_points"] for r in rows] == [0.0, 25.0]


def test_chat_benchmark_counts_compilations(fixture_dir):
  from benchmarks import chat  # pylint: disable=g-import-not-at-top
  # A context no other test uses: a model config of its own, so nothing is compiled yet.
  result = chat.run(fixture_dir, turns=3, max_sequence_length=1000, gen_length=16, steps=8,
                    block_length=8)
  assert [r["bucket"] for r in result["per_turn"]] == [64, 64, 128]
  # Two per bucket (the stream's start and block programs): turn 2 reuses turn 1's.
  assert result["sampler_compiles"] == 4
  assert result["per_turn"][1]["compiles"] == 0


def test_serve_benchmark_batches_concurrent_clients(fixture_dir):
  from benchmarks import serve  # pylint: disable=g-import-not-at-top
  result = serve.run(fixture_dir, clients=[1, 2], requests_per_client=1, repeats=1,
                     batch_size=2, batch_window_ms=200, gen_length=4, steps=2, block_length=2)
  one, two = result["results"]
  assert one["rows_per_call"] == 1 and two["rows_per_call"] == 2  # the pair shared a call
  assert two["requests"] == 2 and two["requests_per_s"] > 0
  assert two["seconds"]["min"] <= two["seconds"]["median"] <= two["seconds"]["max"]
def test_vrpo_variance_benchmark_runs(monkeypatch):
  import math  # pylint: disable=g-import-not-at-top
  from benchmarks import vrpo_variance  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(vrpo_variance, "BUDGETS", (2,))
  result = vrpo_variance.run(draws=3, pairs=2, seq_len=32, seed=0)
  assert len(result["rows"]) == 4 and all(math.isfinite(r["variance"]) for r in result["rows"])
  assert result["table"].count("\n") == 2  # header, rule, one budget


def test_vrpo_e2e_pairs_prefer_the_right_answer():
  from benchmarks import vrpo_e2e  # pylint: disable=g-import-not-at-top
  records = [{"prompt": "3121", "response": "1123"}, {"prompt": "5555", "response": "5555"},
             {"prompt": "90", "response": "09"}]
  pairs = vrpo_e2e.make_pairs(records, ["1123", "5555", "9"], seed=0)
  assert [p["prompt"] for p in pairs] == ["3121", "90"]  # no wrong answer for "5555"
  assert pairs[0]["chosen"] == "1123" and sorted(pairs[0]["rejected"]) == sorted("1123")
  assert pairs[0]["rejected"] != "1123"
  assert pairs[1] == {"prompt": "90", "chosen": "09", "rejected": "9"}  # the model's mistake


def test_block_sampling_summary_prints_the_median_rates():
  """The row as `block_sampling.run` builds it (rates are min / median / max dicts)."""
  from benchmarks import block_sampling, common  # pylint: disable=g-import-not-at-top
  seconds = {"min": 1.0, "median": 2.0, "max": 4.0}
  side = {"seconds": seconds, "tokens_per_s": common.per_second(64, seconds),
          "model_calls": 8, "tokens_per_model_call": 8.0}
  row = {"batch": 1, "cached": side, "recompute": {**side, "model_calls": 9}, "speedup": 1.5,
         "same_tokens": True}
  assert block_sampling.summary(row) == (
      "batch 1: cached 32.0 tok/s (8 calls), recompute 32.0 tok/s (9 calls), x1.50 (medians), "
      "same tokens: True")


def test_report_writes_the_json_then_one_line_per_row(tmp_path, capsys):
  path = tmp_path / "out" / "r.json"
  common.report({"results": [{"n": 1}, {"n": 2}]}, str(path), lambda r: f"row {r['n']}")
  assert json.loads(path.read_text())["results"] == [{"n": 1}, {"n": 2}]
  assert capsys.readouterr().out.strip().splitlines()[-2:] == ["row 1", "row 2"]


def test_block_sft_llada2_model_and_a_trained_style_block_sampling_row(tmp_path):
  """block_sft's llada2 config is a valid LLaDA2 on the task's ids; block_sampling's
  row on its left-padded chat prompts: same tokens cached vs recompute."""
  import pytest  # pylint: disable=g-import-not-at-top
  from benchmarks import block_sampling, block_sft, fast_sampling  # pylint: disable=g-import-not-at-top
  from llada_jax import models  # pylint: disable=g-import-not-at-top
  from llada_jax.frontends import settings as frontend  # pylint: disable=g-import-not-at-top
  paths = fast_sampling.make_task(block_sft.task_dir(str(tmp_path), (4, 6)), num_train=300,
                                  num_test=20, lengths=(4, 6))
  tok, records, seq_len = block_sft.load_task(paths, 2)
  cfg = ModelConfig.from_dict(block_sft.block_config("llada2", paths, seq_len, 2, "", 0.0).model)
  assert (cfg.family, cfg.moe_layers, cfg.vocab_size) == ("llada2", (0, 1, 1, 1), 300)
  assert (cfg.mask_token_id, cfg.eos_token_id) == (tok.mask_id, tok.eos_id)
  rows = fast_sampling.prompt_ids(tok, records)
  prompt, mask = frontend.left_pad(rows, max(map(len, rows)), tok.pad_id)
  args = dict(gen_length=block_sft.GEN_LENGTH, block_length=block_sft.BLOCK_LENGTH,
              steps=block_sft.BLOCK_LENGTH, threshold=0.95)
  row = block_sampling.compare(models.init(cfg), prompt, mask, args, repeats=1)
  assert row["same_tokens"] and row["batch"] == 2
  assert row["cached"]["model_calls"] == row["recompute"]["model_calls"] + 1  # the prefill
  assert block_sampling.find_task(str(tmp_path / "block_sft"), None) == str(
      tmp_path / "task_4_6")  # the one task dir next to the checkpoint
  with pytest.raises(ValueError, match="task: 0 task_"):
    block_sampling.find_task(str(tmp_path / "elsewhere" / "block_sft"), None)


def test_accelerator_benchmark_writes_each_row_of_the_cut_8b_stack(tmp_path, capsys):
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  out = tmp_path / "acc.json"
  accelerator.main(["--small", "--layers", "1", "--batches", "1", "--gen_lengths", "16",
                    "--block_length", "8", "--caches", "none", "--repeats", "1",
                    "--train_batch", "8", "--train_seq", "32", "--train_steps", "1", "--output", str(out)])
  result = json.loads(out.read_text())
  assert result["model"]["layers"] == 1 and result["peak_flops_per_s"] > 0
  parts = [(r["part"], r.get("cache")) for r in result["results"]]
  assert parts == [("sample", "none"), ("train", None)]
  none, step = result["results"]
  assert none["tokens_per_s"]["median"] == 16 / none["seconds"]["median"]
  assert none["mfu_full_forward"] > 0
  assert step["mfu"] > 0 and step["step_seconds"]["min"] > 0
  assert "cache none" in capsys.readouterr().out


def test_accelerator_benchmark_refuses_bad_arguments(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top
  for argv in (["--caches", "none,full"], ["--gen_lengths", "20", "--block_length", "8"],
               ["--official_dir", str(tmp_path)], ["--output", str(tmp_path)],
               ["--train_batch", "3"]):  # the tests' 8 fake devices
    with pytest.raises(SystemExit):
      accelerator.parse_args(argv)
