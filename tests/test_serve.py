"""The OpenAI-compatible server, through the official `openai` client on loopback:
plain and streamed chat / completions equal to `generate`, batching under 16
concurrent requests, bad requests -> 400, and the command line."""

import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import openai
import pytest

from llada_jax.frontends import serve
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Four blocks of 4 tokens, 2 steps a block.
DEFAULTS = {**settings_lib.SAMPLER_ARGS, "seed": 0, "gen_length": 16, "steps": 8,
            "block_length": 4}
NAME = "llada_tiny"


@pytest.fixture(scope="module")
def tok(fixture_dir):
  return load_tokenizer(fixture_dir)


@pytest.fixture(scope="module")
def server(tiny_model, tok):
  """A server on a free loopback port in this process (a thread), with a 200 ms
  batching window so that concurrent test requests share calls."""
  state = serve.Server(tiny_model, tok, DEFAULTS, NAME, batch_size=16, window_s=0.2)
  httpd = state.http_server("127.0.0.1", 0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  httpd.shutdown()
  httpd.server_close()
  state.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)


def _expected(model, tok, ids, padded=True, **changes):
  """generate's tokens for one prompt (padded as the server pads a one-row call, so
  that no new program compiles; padding changes no token) and the text the server
  should return."""
  args = {**DEFAULTS, **changes}
  seed = args.pop("seed")
  length = settings_lib.bucket_length(
      len(ids), model.config.max_sequence_length - args["gen_length"]) if padded else len(ids)
  ids_BL, mask_BL = settings_lib.left_pad([ids], length, tok.pad_id)
  out = np.asarray(sampling.generate(model, ids_BL, mask_BL, rng=jax.random.key(seed),
                                     **args))[0, length:]
  stop_ids = {model.config.eos_token_id, tok.eot_id}
  ends = [i for i, t in enumerate(out.tolist()) if t in stop_ids]
  return out, tok.decode(out[:ends[0]] if ends else out), (ends[0] if ends else len(out))


def _models(base_url):
  with urllib.request.urlopen(base_url + "/models") as r:
    return json.load(r)["data"][0]


def test_chat_and_completion_equal_generate(client, tiny_model, tok):
  messages = [{"role": "user", "content": "Hello there"}]
  _, text, n = _expected(tiny_model, tok, tok.apply_chat_template(messages), padded=False)
  r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16)
  assert r.object == "chat.completion" and r.model == NAME
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == text
  assert r.choices[0].finish_reason == ("stop" if n < 16 else "length")
  ids = tok.apply_chat_template(messages)
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)

  # A completion: 6 tokens asked -> gen_length 8 (two blocks), steps 4 (2 per block).
  prompt = "The quick brown fox"
  out, _, _ = _expected(tiny_model, tok, tok.encode(prompt), gen_length=8, steps=4)
  r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
  first6 = out[:6].tolist()
  stop_ids = {tiny_model.config.eos_token_id, tok.eot_id}
  cut = next((i for i, t in enumerate(first6) if t in stop_ids), 6)
  assert r.choices[0].text == tok.decode(first6[:cut])
  assert r.usage.completion_tokens == cut
  assert r.choices[0].finish_reason == ("stop" if cut < 6 else "length")


def test_stop_strings_and_n(client, tiny_model, tok):
  prompt = "Once upon a time"
  _, text, _ = _expected(tiny_model, tok, tok.encode(prompt))
  assert len(text) >= 3, "the fixture's completion is too short for a stop string"
  stop = text[1:3]
  r = client.completions.create(model=NAME, prompt=prompt, stop=[stop], n=3)
  assert [c.index for c in r.choices] == [0, 1, 2]
  for c in r.choices:  # temperature 0: every row equal
    assert (c.text, c.finish_reason) == (text[:text.find(stop)], "stop")


def test_streaming_chunk_order_and_text(client, tiny_model, tok):
  messages = [{"role": "user", "content": "Tell me a story"}]
  chunks = list(client.chat.completions.create(
      model=NAME, messages=messages, stream=True, stream_options={"include_usage": True}))
  plain = client.chat.completions.create(model=NAME, messages=messages)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert chunks[0].choices[0].delta.content == ""
  deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices
            and c.choices[0].delta.content]
  finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finish) == 1 and chunks.index(finish[0]) == len(chunks) - 2
  assert finish[0].choices[0].finish_reason == plain.choices[0].finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
  assert "".join(deltas) == plain.choices[0].message.content
  # One chunk per committed block at most (4 blocks), and more than one if the text spans
  # several blocks.
  assert 1 <= len(deltas) <= 4
  assert all(c.object == "chat.completion.chunk" for c in chunks)

  stream = client.completions.create(model=NAME, prompt="Once upon a time", stream=True)
  texts = [c.choices[0].text for c in stream]
  assert "".join(texts) == client.completions.create(model=NAME,
                                                     prompt="Once upon a time").choices[0].text


def test_sixteen_concurrent_requests_are_batched(client, server, tiny_model, tok):
  before = _models(server[1])["meta"]
  prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(16)]

  def ask(prompt):
    return client.completions.create(model=NAME, prompt=prompt).choices[0].text

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    texts = list(pool.map(ask, prompts))
  after = _models(server[1])["meta"]
  calls = after["batched_calls"] - before["batched_calls"]
  assert after["batched_rows"] - before["batched_rows"] == 16
  assert calls < 16 and after["largest_call"] > 1, after  # rows shared sampler calls
  # Batched rows (padded to a shared length) equal each prompt sampled alone.
  for prompt, text in list(zip(prompts, texts))[::5]:
    assert text == _expected(tiny_model, tok, tok.encode(prompt))[1]


def test_prompt_buckets_share_a_call_padded_to_the_largest(client, server, tiny_model, tok):
  """A short and a long prompt (two length buckets) sent together run as one call
  left-padded to the longer bucket, each text equal to its prompt sampled alone."""
  prompts = ["Hi there", " ".join(["The quick brown fox jumps over the lazy dog."] * 4)]
  jobs = [serve.parse_request("completion", {"prompt": p}, tok, tiny_model.config, DEFAULTS,
                              NAME, 16) for p in prompts]
  limit = tiny_model.config.max_sequence_length - DEFAULTS["gen_length"]
  lengths = [settings_lib.bucket_length(len(j.choices[0].prompt), limit) for j in jobs]
  assert lengths[0] < lengths[1]
  calls = list(server[0].batcher.plan(jobs[::-1]))
  assert [(length, [c.prompt for _, c in rows]) for _, length, rows in calls] == [
      (lengths[1], [j.choices[0].prompt for j in jobs])]  # shortest bucket first, one call

  before = _models(server[1])["meta"]
  ask = lambda p: client.completions.create(model=NAME, prompt=p).choices[0].text
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    texts = list(pool.map(ask, prompts))
  after = _models(server[1])["meta"]
  assert after["batched_calls"] - before["batched_calls"] == 1, after
  assert texts == [_expected(tiny_model, tok, tok.encode(p))[1] for p in prompts]


@pytest.mark.parametrize("kind, body, message", [
    ("chat", {"model": NAME}, "messages: expected a non-empty list"),
    ("chat", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("chat", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, "content"),
    ("completion", {"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completion", {"model": NAME, "prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("completion", {"model": "gpt-4", "prompt": "x"}, "'gpt-4' is not served here"),
    ("completion", {"model": NAME, "prompt": 5}, "prompt"),
    ("completion", {"model": NAME, "prompt": "x", "temperature": -1}, "temperature"),
    ("completion", {"model": NAME, "prompt": "x", "max_tokens": 600}, "max_sequence_length"),
    ("completion", {"model": NAME, "prompt": "x", "n": 17}, "n: expected"),
    ("completion", {"model": NAME, "prompt": "x", "stop": [""]}, "stop"),
    ("completion", {"model": NAME, "prompt": "x", "remasking": "best"}, "remasking"),
])
def test_bad_requests_are_400(tok, tiny_model, kind, body, message):
  with pytest.raises(serve.BadRequest, match=re.escape(message)):
    serve.parse_request(kind, body, tok, tiny_model.config, DEFAULTS, NAME, 16)


def test_bad_request_over_http_then_still_serving(client, server):
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=NAME, prompt="x", max_tokens=-3)
  assert e.value.status_code == 400
  assert e.value.body["message"] == "max_tokens: expected a positive integer, got -3"
  assert e.value.body["param"] == "max_tokens"
  req = urllib.request.Request(server[1] + "/completions", data=b"{not json",
                               headers={"Content-Type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as http_error:
    urllib.request.urlopen(req)
  assert http_error.value.code == 400
  assert "not JSON" in json.load(http_error.value)["error"]["message"]
  assert client.completions.create(model=NAME, prompt="Still there?").choices[0].text is not None
  assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.slow
def test_llada2_model_is_served(tok):
  """A block-diffusion model (llada2) behind the same server: its family's settings
  check (dense-only settings refused, steps per block), streamed and plain text equal
  to generate's."""
  import llada_jax  # pylint: disable=g-import-not-at-top
  model = llada_jax.load(str(ROOT / "tests/fixtures/llada2_tiny"), mask_token_id=995,
                         moe_impl="dense")
  defaults = {**DEFAULTS, "steps": 4, "block_length": 8}
  parse = lambda body: serve.parse_request("completion", body, tok, model.config, defaults,
                                           NAME, 16)
  with pytest.raises(serve.BadRequest, match="cfg_scale"):
    parse({"prompt": "x", "cfg_scale": 1.0})
  job = parse({"prompt": "x", "steps": 3, "max_tokens": 9})  # 3: not a multiple of 2 blocks
  assert (job.settings["steps"], job.settings["gen_length"]) == (3, 16)
  state = serve.Server(model, tok, defaults, NAME, window_s=0.)
  httpd = state.http_server("127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  try:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                      api_key="unused", max_retries=0)
    prompt = "Once upon a time"
    _, text, _ = _expected(model, tok, tok.encode(prompt), steps=4, block_length=8)
    assert c.completions.create(model=NAME, prompt=prompt).choices[0].text == text
    chunks = c.completions.create(model=NAME, prompt=prompt, stream=True)
    texts = [chunk.choices[0].text for chunk in chunks]
    assert "".join(texts) == text
    assert sum(map(bool, texts)) >= 2  # a chunk per decoded block (gen 16 = 2 blocks+)
  finally:
    httpd.shutdown()
    httpd.server_close()
    state.close()


@pytest.mark.slow
def test_command_line_server(fixture_dir):
  """`python -m llada_jax.serve` in a subprocess: serves a chat completion."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "llada_jax.serve", "--checkpoint", fixture_dir, "--port", "0",
       "--gen_length", "8", "--steps", "4", "--block_length", "4"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  try:
    line = proc.stdout.readline()
    match = re.search(r"http://\S+/v1", line)
    assert match, line
    c = openai.OpenAI(base_url=match.group(0), api_key="unused", max_retries=0)
    r = c.chat.completions.create(model="llada_tiny", messages=[{"role": "user",
                                                                 "content": "Hi"}])
    assert r.choices[0].finish_reason in ("stop", "length")
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_stream_steps_sends_a_chunk_per_step(tiny_model, tok):
  """With stream_steps the deltas follow each denoising step (at most 8 here) and
  still add up to the non-streamed text."""
  batcher = serve.Batcher(tiny_model, tok, window_s=0., stream_steps=True)
  try:
    def run(stream):
      job = serve.parse_request("completion", {"prompt": "Once upon a time", "stream": stream},
                                tok, tiny_model.config, DEFAULTS, NAME, 16)
      batcher.submit(job)
      events = iter(job.events.get, ("done", None, None))
      return [value for kind, _, value in events if kind == "delta"], job.choices[0].text
    deltas, text = run(True)
    assert "".join(deltas) == text == run(False)[1]
    assert 1 <= len(deltas) <= 8
  finally:
    batcher.close()
