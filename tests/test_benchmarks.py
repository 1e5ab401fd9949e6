"""The benchmark scripts run end to end (tiny sizes; their numbers are not asserted)."""

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


def test_chat_benchmark_counts_compilations(fixture_dir):
  from benchmarks import chat  # pylint: disable=g-import-not-at-top
  # A context no other test uses: a model config of its own, so nothing is compiled yet.
  result = chat.run(fixture_dir, turns=3, max_sequence_length=1000, gen_length=16, steps=8,
                    block_length=8)
  assert [r["bucket"] for r in result["per_turn"]] == [64, 64, 128]
  assert result["sampler_compiles"] == 2  # one per bucket: turn 2 reuses turn 1's program
  assert result["per_turn"][1]["compiles"] == 0
