"""llada_jax.evaluate: the lm-eval model, through lm_eval.simple_evaluate and our CLI."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import llada_jax  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from llada_jax.frontends import evaluate  # noqa: E402

SMALL = dict(mc_num=4, mc_batch_size=2, steps=8, gen_length=8, block_length=8, seed=3)
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(fixture_dir):
  return evaluate.LLaDAEval(checkpoint=fixture_dir, batch_size=1, **SMALL)


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_model_args_are_checked_and_converted(fixture_dir):
  settings, gen = evaluate.parse_model_args(
      {"checkpoint": fixture_dir, "steps": "64", "logits_eos_inf": "true", "cfg": 1,
       "temperature": 0, "batch_size": "4"})
  assert gen["steps"] == 64 and gen["logits_eos_inf"] is True
  assert isinstance(gen["temperature"], float) and settings["cfg"] == 1.0
  assert settings["batch_size"] == 4 and gen["block_length"] == 128  # generate's default
  # Every keyword of generate (but rng/trace/constraints) is a model arg.
  assert set(gen) == set(evaluate.settings_lib.SAMPLER_ARGS) >= {"steps", "remasking",
                                                                 "cfg_scale"}
  with pytest.raises(ValueError, match="unknown argument.*bogus.*stepz"):
    evaluate.parse_model_args({"checkpoint": fixture_dir, "stepz": 3, "bogus": 1})
  with pytest.raises(ValueError, match="steps=.*not a valid int"):
    evaluate.parse_model_args({"checkpoint": fixture_dir, "steps": 2.5})
  with pytest.raises(ValueError, match="checkpoint=DIR is required"):
    evaluate.parse_model_args({})
  assert settings["padding"] == "bucket"
  assert evaluate.parse_model_args(
      {"checkpoint": fixture_dir, "padding": "longest"})[0]["padding"] == "longest"
  with pytest.raises(ValueError, match="padding='fixed' is not one of"):
    evaluate.parse_model_args({"checkpoint": fixture_dir, "padding": "fixed"})
  with pytest.raises(ValueError, match="--batch_size"):
    evaluate.parse_model_args({"checkpoint": fixture_dir, "batch_size": "auto"})
  with pytest.raises(ValueError, match="mc_num=6 is not a multiple of mc_batch_size=4"):
    evaluate.LLaDAEval(checkpoint=fixture_dir, mc_num=6, mc_batch_size=4)
  with pytest.raises(ValueError, match="block_length"):  # sampler settings checked up front
    evaluate.LLaDAEval(checkpoint=fixture_dir, gen_length=8, block_length=3)
  with pytest.raises(ValueError, match="checkpoint=/nonexistent is not a directory"):
    evaluate.LLaDAEval(checkpoint="/nonexistent")


def test_helpers():
  assert evaluate.stop_at("a, b. c\nd", ["\n", "."]) == "a, b"
  assert evaluate.stop_at("abc", ["x", ""]) == "abc"
  assert evaluate.parse_mesh("1x-1x2") == (1, -1, 2)
  with pytest.raises(ValueError, match="mesh="):
    evaluate.parse_mesh("4x2")


def test_padding_model_arg(lm):
  """padding=bucket: the front ends' length and row buckets; padding=longest: none."""
  lm.batch_size = 8
  try:
    assert lm.padded_shape(17, 3, 512) == (32, 4)
    assert lm.padded_shape(300, 8, 400) == (400, 8)  # capped at the limit
    lm.padding = "longest"
    assert lm.padded_shape(17, 3, 512) == (17, 3)
  finally:
    lm.batch_size, lm.padding = 1, "bucket"


def test_loglikelihood_is_the_mc_estimator(lm):
  args = [("The function returns", " a list"), ("", "hello world"), ("x = 1 ", "+ 2")]
  got = lm.loglikelihood([_req("loglikelihood", *a) for a in args])
  pairs = [lm._encode_pair(*a) for a in args]
  # One request alone = log_likelihood on its ids with the same seed (the eval pads to a
  # length bucket, 16 here; padding changes no draw).
  want = [llada_jax.log_likelihood(lm.model, p, a, mc_num=4, batch_size=2, rng=3, pad_to=16)
          for p, a in pairs]
  assert got == [(pytest.approx(w, rel=1e-5), False) for w in want]
  assert llada_jax.log_likelihood(lm.model, *pairs[0], mc_num=4, batch_size=2, rng=3) == \
      pytest.approx(got[0][0], rel=1e-5)
  ctx_ids, cont_ids = lm._encode_pair("x = 1 ", "+ 2")
  assert lm.tok.decode(cont_ids).startswith(" ")  # trailing space moved to the continuation
  assert lm._encode_pair("", "hi")[0] == [lm.tok.bos_id]
  # Batched: one call per batch, same estimates as that call.
  lm.batch_size = 2
  try:
    batched = lm.loglikelihood([_req("loglikelihood", *a) for a in args[:2]])
  finally:
    lm.batch_size = 1
  longest_first = sorted(pairs[:2], key=lambda p: -len(p[0] + p[1]))
  want = llada_jax.log_likelihood(lm.model, [p for p, _ in longest_first],
                                  [a for _, a in longest_first], mc_num=4, batch_size=2, rng=3,
                                  pad_to=16)
  assert sorted(s for s, _ in batched) == pytest.approx(sorted(want), rel=1e-5)


def test_greedy_check(lm):
  ctx = lm.tok.encode("import os")
  out = np.asarray(llada_jax.generate(lm.model, ctx, steps=3, gen_length=3, block_length=3))
  greedy = out[len(ctx):].tolist()
  wrong = greedy[:2] + [(greedy[2] + 1) % 900]
  assert lm.greedy_matches([(ctx, greedy), (ctx, wrong), (ctx[:2], greedy[:1])])[:2] == \
      [True, False]


def test_loglikelihood_rolling(lm):
  text = "Return the number of items in a container."
  ids = lm.tok.encode(text)
  [got] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
  want = llada_jax.log_likelihood(lm.model, [lm.tok.bos_id], ids, mc_num=4, batch_size=2, rng=3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Longer than max_length: disjoint windows that together score every token once.
  seen = []
  score_pairs = lm.score_pairs
  lm.max_length = 8
  try:
    lm.score_pairs = lambda pairs, desc: seen.extend(pairs) or score_pairs(pairs, desc)
    [long] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
  finally:
    lm.max_length = lm.model.config.max_sequence_length
    del lm.score_pairs
  assert len(seen) > 1 and sum((a for _, a in seen), []) == ids
  assert all(len(c) + len(a) <= 8 and c for c, a in seen)
  assert np.isfinite(long) and long < 0


def test_generate_until_batches_and_stops(lm):
  kwargs = {"until": [], "logits_eos_inf": True, "max_gen_toks": 5}
  prompts = ["def add(a, b):", "The", "Return the number of items"]
  alone = [lm.generate_until([_req("generate_until", p, kwargs)])[0] for p in prompts]
  lm.batch_size = 2
  try:
    batched = lm.generate_until([_req("generate_until", p, kwargs) for p in prompts])
  finally:
    lm.batch_size = 1
  assert batched == alone  # left padding and reordering change nothing
  text = alone[0]
  assert len(text) >= 4
  stop = text[len(text) // 2:len(text) // 2 + 2]
  [cut] = lm.generate_until([_req("generate_until", prompts[0], {**kwargs, "until": [stop]})])
  assert cut == text[:text.index(stop)]
  # Settings by generate's names in the task's generation kwargs.
  ids = lm.tok.encode(prompts[1])
  out = np.asarray(llada_jax.generate(lm.model, ids, steps=4, gen_length=8, block_length=4,
                                      rng=0))
  [got] = lm.generate_until([_req("generate_until", prompts[1],
                                  {"until": ["\n\n"], "steps": 4, "block_length": 4})])
  want = out[len(ids):].tolist()
  ends = [i for i, t in enumerate(want) if t in lm.stop_ids]
  assert got == evaluate.stop_at(lm.tok.decode(want[:ends[0]] if ends else want), ["\n\n"])


def test_chat_template_text_encodes_to_template_ids(lm):
  messages = [{"role": "user", "content": " What is 2+2? "}]
  text = lm.apply_chat_template(messages)
  assert lm.tok.encode(text) == lm.tok.apply_chat_template(messages)


def _write_tasks(tmp_path):
  questions = [("x = [1, 2]; len(x) is", [" 2", " 3", " 7"], 0),
               ("The keyword that defines a function is", [" def", " class"], 0),
               ("True and False is", [" False", " True"], 0)]
  with open(tmp_path / "mc.jsonl", "w") as f:
    for q, choices, label in questions:
      f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
  with open(tmp_path / "gen.jsonl", "w") as f:
    for q in ("Print hello:", "Sum of 2 and 3:"):
      f.write(json.dumps({"question": q, "answer": "5", "text": q + " A line of text."}) + "\n")
  common = "dataset_path: json\ntest_split: test\n"
  (tmp_path / "tiny_mc.yaml").write_text(common + textwrap.dedent(f"""\
      task: tiny_mc
      dataset_kwargs:
        data_files:
          test: {tmp_path / 'mc.jsonl'}
      output_type: multiple_choice
      doc_to_text: "{{{{question}}}}"
      doc_to_choice: "{{{{choices}}}}"
      doc_to_target: "{{{{label}}}}"
      metric_list:
        - metric: acc
      """))
  (tmp_path / "tiny_gen.yaml").write_text(common + textwrap.dedent(f"""\
      task: tiny_gen
      dataset_kwargs:
        data_files:
          test: {tmp_path / 'gen.jsonl'}
      output_type: generate_until
      doc_to_text: "{{{{question}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs:
        until: ["e"]
        logits_eos_inf: true
      metric_list:
        - metric: exact_match
      """))
  (tmp_path / "tiny_ppl.yaml").write_text(common + textwrap.dedent(f"""\
      task: tiny_ppl
      dataset_kwargs:
        data_files:
          test: {tmp_path / 'gen.jsonl'}
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{{{text}}}}"
      metric_list:
        - metric: word_perplexity
      """))
  return questions


def test_simple_evaluate_with_local_tasks(lm, tmp_path):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  questions = _write_tasks(tmp_path)
  lm.batch_size = 4
  try:
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                                  task_manager=manager,
                                  log_samples=True)
  finally:
    lm.batch_size = 1
  acc = out["results"]["tiny_mc"]["acc,none"]
  scores = [[lm.loglikelihood([_req("loglikelihood", q, c)])[0][0] for c in choices]
            for q, choices, _ in questions]
  assert acc == pytest.approx(np.mean([np.argmax(s) == label
                                       for s, (_, _, label) in zip(scores, questions)]))
  for sample in out["samples"]["tiny_gen"]:
    assert "e" not in sample["filtered_resps"][0]
  assert np.isfinite(out["results"]["tiny_ppl"]["word_perplexity,none"])


@pytest.mark.slow
def test_cli_entry_point(fixture_dir, tmp_path):
  _write_tasks(tmp_path)
  args = ",".join(f"{k}={v}" for k, v in {"checkpoint": fixture_dir, **SMALL}.items())
  cmd = [sys.executable, "-m", "llada_jax.evaluate", "--model", "llada_jax", "--model_args",
         args, "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tmp_path),
         "--batch_size", "4", "--limit", "2", "--output_path", str(tmp_path / "out")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  # Bad model args fail before lm-eval indexes its tasks or any model loads.
  bad = subprocess.run(cmd[:6] + [args + ",stepz=3"] + cmd[7:], capture_output=True, text=True,
                       env=env, timeout=300, cwd=tmp_path)
  assert bad.returncode == 2 and "unknown argument(s) stepz" in bad.stderr
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "tiny_mc" in run.stdout and "acc" in run.stdout
  [result] = list((tmp_path / "out").rglob("results*.json"))
  results = json.loads(result.read_text())["results"]
  assert 0 <= results["tiny_mc"]["acc,none"] <= 1 and "tiny_gen" in results
