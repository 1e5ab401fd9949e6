"""Throughput of the OpenAI-compatible server under concurrent clients.

  python -m benchmarks.serve [--checkpoint tests/fixtures/llada_tiny] [--clients 1,4,16]
      [--requests_per_client 4] [--repeats 3] [--gen_length 32 --steps 32 --block_length 8]
      [--batch_window_ms 10] [--output out/serve.json]

Starts `llada_jax.frontends.serve.Server` in this process on a free loopback
port, compiles the sampler for every row bucket (1, 2, 4, ... --batch_size) of
the prompts' length bucket first, then per client count runs --repeats rounds
in which every client (a thread) sends --requests_per_client completions one
after another over HTTP. Reports, per client count, the round's wall seconds
(min, median, max), requests/s and tokens/s at the median (completion tokens
as the API counts them, up to EOS, and generated tokens = requests x
gen_length, what the sampler computed), the sampler calls and rows per call
the server ran, and the load average before and after (the CPU may be shared).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
import urllib.request

import numpy as np
from absl import app, flags

from benchmarks import common
from llada_jax.checkpoints import loading
from llada_jax.frontends import serve
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
PROMPT = "Question {i}: what is the sum of {i} and {j}? Answer:"


def _define_flags():
  flags.DEFINE_string("checkpoint", "tests/fixtures/llada_tiny", "Model directory.")
  flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent client counts.")
  flags.DEFINE_integer("requests_per_client", 4, "Requests each client sends per round.")
  flags.DEFINE_integer("repeats", 3, "Timed rounds per client count.")
  flags.DEFINE_integer("gen_length", 32, "generate's gen_length (the server default).")
  flags.DEFINE_integer("steps", 32, "generate's steps.")
  flags.DEFINE_integer("block_length", 8, "generate's block_length.")
  flags.DEFINE_integer("batch_size", 16, "The server's rows per sampler call.")
  flags.DEFINE_float("batch_window_ms", 10., "The server's batching window.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def _post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req) as r:
    return json.load(r)


def prompts(clients: int, per_client: int) -> list[list[str]]:
  """Each client's prompts."""
  return [[PROMPT.format(i=c, j=k) for k in range(per_client)] for c in range(clients)]


def warm_up(model, tok, texts: list[str], settings: dict, batch_size: int) -> None:
  """Compiles the sampler for each (length bucket, row bucket) the server may run
  `texts` at, so that no round is timed compiling."""
  settings = dict(settings)
  seed = settings.pop("seed")
  limit = model.config.max_sequence_length - settings["gen_length"]
  by_length = {settings_lib.bucket_length(len(tok.encode(t)), limit): tok.encode(t)
               for t in texts}
  for length, ids in by_length.items():
    rows = 1
    while True:
      prompt, _ = settings_lib.left_pad([ids] * rows, length, tok.pad_id)
      mask = (prompt != tok.pad_id) | (np.arange(length) >= length - len(ids))
      np.asarray(sampling.generate(model, prompt, mask.astype(np.int32), rng=seed, **settings))
      if rows >= batch_size:
        break
      rows = settings_lib.bucket_rows(rows * 2, batch_size)


def run_round(url: str, clients: int, per_client: int) -> tuple[float, int]:
  """One round: `clients` threads, each sending `per_client` completions in turn ->
  (wall seconds, completion tokens)."""
  texts = prompts(clients, per_client)

  def client(c: int) -> int:
    return sum(_post(url, {"prompt": t})["usage"]["completion_tokens"] for t in texts[c])

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    tokens = sum(pool.map(client, range(clients)))
  return time.perf_counter() - start, tokens


def run(checkpoint: str, clients: list[int], requests_per_client: int, repeats: int,
        batch_size: int, batch_window_ms: float, **generate_settings) -> dict:
  machine = common.machine()  # the load average before any work
  model = loading.load(checkpoint)
  tok = load_tokenizer(checkpoint)
  settings = {**settings_lib.SAMPLER_ARGS, "seed": 0, **generate_settings}
  settings_lib.check_settings(settings, model.config)
  warm_up(model, tok, sum(prompts(max(clients), requests_per_client), []), settings,
          batch_size)
  state = serve.Server(model, tok, settings, "bench", batch_size=batch_size,
                       window_s=batch_window_ms / 1000)
  httpd = state.http_server("127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
  results = []
  try:
    for n in clients:
      row = {"clients": n, "requests": n * requests_per_client, "loadavg_before": os.getloadavg()}
      stats_before = dict(state.batcher.stats)
      rounds = [run_round(url, n, requests_per_client) for _ in range(repeats)]
      times = [t for t, _ in rounds]
      median = float(np.median(times))
      calls = state.batcher.stats["batched_calls"] - stats_before["batched_calls"]
      row.update({
          "seconds": {"min": min(times), "median": median, "max": max(times)},
          "requests_per_s": row["requests"] / median,
          "completion_tokens_per_s": float(np.median([k for _, k in rounds])) / median,
          "generated_tokens_per_s": row["requests"] * settings["gen_length"] / median,
          "sampler_calls_per_round": calls / repeats,
          "rows_per_call": row["requests"] * repeats / calls,
          "loadavg_after": os.getloadavg()})
      results.append(row)
  finally:
    httpd.shutdown()
    httpd.server_close()
    state.close()
  return {"benchmark": "serve", "checkpoint": checkpoint, "machine": machine,
          "settings": {k: settings[k] for k in ("gen_length", "steps", "block_length")},
          "batch_size": batch_size, "batch_window_ms": batch_window_ms,
          "requests_per_client": requests_per_client, "repeats": repeats, "results": results}


def main(argv):
  del argv
  result = run(FLAGS.checkpoint, [int(c) for c in FLAGS.clients], FLAGS.requests_per_client,
               FLAGS.repeats, FLAGS.batch_size, FLAGS.batch_window_ms,
               gen_length=FLAGS.gen_length, steps=FLAGS.steps, block_length=FLAGS.block_length)
  common.write_json(result, FLAGS.output)
  for r in result["results"]:
    print(f"{r['clients']:>3} clients: {r['requests_per_s']:.2f} requests/s, "
          f"{r['generated_tokens_per_s']:.1f} generated tokens/s, "
          f"{r['rows_per_call']:.1f} rows per sampler call (load {r['loadavg_before'][0]:.1f})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
