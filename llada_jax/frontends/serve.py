"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models.

  python -m llada_jax.serve --checkpoint DIR|OWNER/NAME [--host 127.0.0.1] [--port 8000] \\
      [--batch_size 16] [--batch_window_ms 10] [--stream_steps] [sampler flags]

The sampler flags (`settings.add_sampler_flags`, at the chat defaults) are every
request's defaults. A request may set, besides OpenAI's fields, any `generate`
setting under its own name (steps, block_length, remasking, cfg_scale, ...).

- `max_tokens` (chat: also `max_completion_tokens`) -> gen_length rounded up to
  whole blocks, the steps per block kept (unless the request gives `steps`); the
  reply holds at most max_tokens tokens. `temperature`, `seed` -> generate's.
- A completion ends at the first EOS / EoT (finish_reason "stop"), at the
  earliest `stop` string (cut before it, "stop") or at max_tokens ("length").
- `n` choices are n rows of the batch; `stream=true` sends server-sent events in
  OpenAI's order: a role chunk per choice (chat), a chunk per committed block
  (`generate_stream`; with --stream_steps one per step, all of a block's steps
  sent when its call returns), a finish_reason chunk per choice, a usage chunk
  when `stream_options.include_usage`, then `data: [DONE]`. Text that may still
  turn out to start a stop string is held back until it cannot.
- Batching: one worker thread owns the model. It takes the queued requests and
  keeps taking more until none has come for --batch_window_ms, --batch_size rows
  wait, or 4 windows have passed; groups their rows by sampler settings and runs
  one sampler call per group of at most --batch_size rows, left-padded to the
  largest prompt-length bucket among them (`settings.bucket_length`; padding
  changes no token) and to a power-of-two row count (`bucket_rows`), so that
  few programs compile. Requests arriving meanwhile form the next batch, so
  throughput grows with load. All
  rows of a call share the PRNG key `seed`, so with temperature > 0 a choice
  depends on its row. /v1/models reports the calls and rows run (`meta`).
- A bad request gets HTTP 400 and an OpenAI-style error naming the field; a
  failure inside the sampler fails that batch's requests (500), not the server.

Standard library only (`http.server`, one thread per connection, plus the
worker): the work is one compiled sampler call per batch, so an async stack
would add a dependency without adding throughput.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from llada_jax import errors
from llada_jax.frontends import chat
from llada_jax.frontends import settings as settings_lib
from llada_jax.sampling import sampler as sampling

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # as OpenAI
MAX_WINDOWS = 4  # a batch waits for more requests at most this many batching windows


class BadRequest(ValueError):
  """A request the server refuses (HTTP 400); `param` names the field."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


# --- requests -------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
  """One completion of a request: its row's tokens as they commit, and what was sent."""
  index: int
  prompt: list[int]
  text: str = ""  # sent so far
  tokens: int = 0  # completion tokens counted
  finish_reason: str | None = None


@dataclasses.dataclass
class Job:
  """A parsed request: its choices (one batch row each), settings and event queue."""
  kind: str  # "chat" | "completion"
  choices: list[Choice]
  settings: dict[str, Any]  # generate's keyword arguments plus "seed"
  max_tokens: int
  stop: list[str]
  stream: bool
  include_usage: bool
  prompt_tokens: int = 0
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  left: int = 0  # choices not finished

  def __post_init__(self):
    self.left = len(self.choices)


def _get(body: dict, name: str, kinds: tuple[type, ...], default=None):
  """body[name] (default when absent or null), BadRequest unless one of `kinds`."""
  value = body.get(name)
  if value is None:
    return default
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise BadRequest(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got "
                     f"{type(value).__name__}", name)
  return value


def _message_text(content: Any, n: int) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise BadRequest(f"messages[{n}].content: expected a string or a list of text parts",
                   "messages")


def chat_prompt(tok, body: dict) -> list[int]:
  """The chat-templated ids of `messages` (a non-empty list of {role, content})."""
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("messages: expected a non-empty list of {role, content} objects",
                     "messages")
  clean = []
  for n, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise BadRequest(f"messages[{n}]: expected an object with role one of {ROLES}",
                       "messages")
    clean.append({"role": m["role"], "content": _message_text(m.get("content"), n)})
  try:
    return tok.apply_chat_template(clean)
  except ValueError as e:
    raise BadRequest(f"messages: {e}", "messages") from e


def completion_prompts(tok, body: dict) -> list[list[int]]:
  """The ids of `prompt`: a string or a non-empty list of strings."""
  prompt = body.get("prompt")
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not isinstance(prompts, list) or not prompts or not all(
      isinstance(p, str) for p in prompts):
    raise BadRequest("prompt: expected a string or a non-empty list of strings", "prompt")
  ids = [tok.encode(p) for p in prompts]
  if not all(ids):
    raise BadRequest("prompt: a prompt encodes to no tokens", "prompt")
  return ids


def request_settings(defaults: dict[str, Any], body: dict, family: str
                     ) -> tuple[dict[str, Any], int]:
  """A request's sampler settings: the defaults, its generate-named fields, then
  `max_tokens` as gen_length in whole blocks -> (settings, max_tokens)."""
  settings = {**defaults, **{k: body[k] for k in settings_lib.LINE_SETTINGS & set(body)}}
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  if max_tokens is None:
    return settings, settings["gen_length"]
  if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
    raise BadRequest(f"max_tokens: expected a positive integer, got {max_tokens!r}",
                     "max_tokens")
  block = settings["block_length"]
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise BadRequest(f"block_length: expected a positive integer, got {block!r}",
                     "block_length")
  gen_length = -(-max_tokens // block) * block
  steps_per_block = (settings["steps"] if family == "llada2" else  # llada2: per block
                     max(1, settings["steps"] * block // settings["gen_length"]))
  if "steps" not in body and family != "llada2":
    settings["steps"] = steps_per_block * (gen_length // block)
  settings["gen_length"] = gen_length
  return settings, max_tokens


def parse_request(kind: str, body: Any, tok, cfg, defaults: dict[str, Any], model_name: str,
                  batch_size: int) -> Job:
  """A request body (parsed JSON) -> Job; BadRequest naming the bad field."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  model = body.get("model")
  if model is not None and model != model_name:
    raise BadRequest(f"model: {model!r} is not served here; this server serves "
                     f"{model_name!r} (GET /v1/models)", "model")
  prompts = [chat_prompt(tok, body)] if kind == "chat" else completion_prompts(tok, body)
  n = _get(body, "n", (int,), 1)
  if not 1 <= n <= batch_size:
    raise BadRequest(f"n: expected 1 <= n <= {batch_size} (the server's --batch_size), "
                     f"got {n}", "n")
  stop = _get(body, "stop", (str, list), [])
  stop = [stop] if isinstance(stop, str) else stop
  if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
    raise BadRequest(f"stop: expected a string or up to {MAX_STOP} non-empty strings", "stop")
  stream = _get(body, "stream", (bool,), False)
  include_usage = bool(_get(body, "stream_options", (dict,), {}).get("include_usage"))
  settings, max_tokens = request_settings(defaults, body, cfg.family)
  try:
    settings_lib.check_settings(settings, cfg, max(map(len, prompts)))
    hash(_settings_key(settings))
  except (ValueError, TypeError) as e:
    raise BadRequest(str(e), str(e).split(":")[0]) from e
  choices = [Choice(p * n + k, ids) for p, ids in enumerate(prompts) for k in range(n)]
  return Job(kind, choices, settings, max_tokens, stop, stream, include_usage,
             prompt_tokens=sum(map(len, prompts)))


# --- completions as they commit -------------------------------------------------------------


def visible(tok, tokens: np.ndarray, stop_ids: set[int], job: Job, final: bool
            ) -> tuple[str, int, str | None]:
  """(text, tokens counted, finish_reason or None) of a choice's committed tokens:
  cut at EOS / EoT, max_tokens and the stop strings; when not final, without the
  tail that may still grow into a stop string or a multi-byte character."""
  ids = tokens.tolist()[:job.max_tokens]
  ends = [i for i, t in enumerate(ids) if t in stop_ids]
  reason = None
  if ends:
    ids, reason = ids[:ends[0]], "stop"
  elif final or len(ids) == job.max_tokens:
    reason = "length"
  text = tok.decode(ids)
  cut = settings_lib.stop_at(text, job.stop)
  if len(cut) < len(text):
    return cut, len(ids), "stop"
  if reason is None:
    hold = max((len(s) - 1 for s in job.stop), default=0)
    text = text[:len(text) - hold].rstrip("\ufffd")
  return text, len(ids), reason


def update(job: Job, choice: Choice, text: str, tokens: int, reason: str | None) -> None:
  """Sends the new text of `choice` (and its finish) to the job's listener."""
  if choice.finish_reason is not None:
    return
  if text.startswith(choice.text) and len(text) > len(choice.text):
    job.events.put(("delta", choice.index, text[len(choice.text):]))
    choice.text = text
  choice.tokens = tokens
  if reason is not None:
    choice.finish_reason = reason
    job.events.put(("finish", choice.index, reason))
    job.left -= 1
    if not job.left:
      job.events.put(("done", None, None))


# --- the batching worker --------------------------------------------------------------------


def _settings_key(settings: dict[str, Any]) -> tuple:
  return tuple(sorted(settings.items()))


class Batcher:
  """The worker thread: gathers queued jobs into batched sampler calls."""

  def __init__(self, model, tok, batch_size: int = 16, window_s: float = 0.01,
               stream_steps: bool = False):
    self.model, self.tok = model, tok
    self.batch_size, self.window_s, self.stream_steps = batch_size, window_s, stream_steps
    self.stop_ids = {i for i in (model.config.eos_token_id, tok.eot_id) if i is not None}
    self.stats = {"batched_calls": 0, "batched_rows": 0, "requests": 0, "largest_call": 0}
    self.jobs: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._loop, name="llada-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    self.jobs.put(job)

  def close(self) -> None:
    self.jobs.put(None)
    self._thread.join()

  def _gather(self) -> list[Job] | None:
    """The next jobs: the first queued (blocking), then more until none has come for
    a window, batch_size rows are waiting, or MAX_WINDOWS windows have passed."""
    first = self.jobs.get()
    if first is None:
      return None
    jobs, rows = [first], len(first.choices)
    start = last = time.monotonic()
    while rows < self.batch_size:
      now = time.monotonic()
      left = min(last + self.window_s, start + MAX_WINDOWS * self.window_s) - now
      try:
        job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
      except queue.Empty:
        break
      if job is None:
        self.jobs.put(None)  # close after this batch
        break
      jobs.append(job)
      rows, last = rows + len(job.choices), time.monotonic()
    return jobs

  def plan(self, jobs: list[Job]) -> Iterator[tuple[dict, int, list[tuple[Job, Choice]]]]:
    """(settings, padded prompt length, rows) per sampler call: rows grouped by
    settings, shortest prompt bucket first, at most batch_size a call, each call
    left-padded to the largest bucket among its rows (padding changes no token)."""
    groups: dict[tuple, list[tuple[int, Job, Choice]]] = {}
    for job in jobs:
      limit = self.model.config.max_sequence_length - job.settings["gen_length"]
      for c in job.choices:
        length = settings_lib.bucket_length(len(c.prompt), limit)
        groups.setdefault(_settings_key(job.settings), []).append((length, job, c))
    for key, rows in groups.items():
      rows.sort(key=lambda row: row[0])  # stable: a job's choices stay in order
      for start in range(0, len(rows), self.batch_size):
        call = rows[start:start + self.batch_size]
        yield dict(key), call[-1][0], [(job, c) for _, job, c in call]

  def _loop(self) -> None:
    while (jobs := self._gather()) is not None:
      self.stats["requests"] += len(jobs)
      for settings, length, rows in self.plan(jobs):
        try:
          self.run(settings, length, rows)
        except Exception as e:  # pylint: disable=broad-except  (the server keeps serving)
          log.exception("sampler call failed")
          for job in {id(j): j for j, _ in rows}.values():
            job.events.put(("error", None, f"{type(e).__name__}: {e}"))

  def run(self, settings: dict[str, Any], length: int, rows: list[tuple[Job, Choice]]) -> None:
    """One sampler call for `rows` (same settings), reporting each block as it commits."""
    settings = dict(settings)
    seed = settings.pop("seed")
    ids, mask = settings_lib.left_pad([c.prompt for _, c in rows], length,
                                      self.tok.pad_id,
                                      settings_lib.bucket_rows(len(rows), self.batch_size))
    self.stats["batched_calls"] += 1
    self.stats["batched_rows"] += len(rows)
    self.stats["largest_call"] = max(self.stats["largest_call"], len(rows))
    start = time.perf_counter()
    if any(job.stream for job, _ in rows):
      steps = self.stream_steps and self.model.config.family != "llada2"
      canvases = sampling.generate_stream(self.model, ids, mask, rng=jax.random.key(seed),
                                          trace=steps, return_nfe=steps, **settings)
      seen = 0  # steps reported
      for out in canvases:
        canvas = out[0] if steps else out
        for step_canvas in (out[1].canvas_SBL[seen:out[2]] if steps else [canvas]):
          self._report(step_canvas, length, rows, final=False)
        seen = out[2] if steps else 0
    else:
      canvas = np.asarray(sampling.generate(self.model, ids, mask, rng=jax.random.key(seed),
                                            **settings))
    self._report(canvas, length, rows, final=True)
    log.info("sampler call: %d rows of %d requests, prompt bucket %d, %.2f s", len(rows),
             len({id(j) for j, _ in rows}), length, time.perf_counter() - start)

  def _report(self, canvas: np.ndarray, length: int, rows, final: bool) -> None:
    mask_id = self.model.config.mask_token_id
    for r, (job, choice) in enumerate(rows):
      gen = np.asarray(canvas[r, length:])
      if not final:  # the committed prefix: up to the first masked position
        masked = np.flatnonzero(gen == mask_id)
        gen = gen[:masked[0]] if masked.size else gen
      update(job, choice, *visible(self.tok, gen, self.stop_ids, job, final))


# --- HTTP -----------------------------------------------------------------------------------


class Server:
  """The served model: request parsing, the batcher, and the HTTP server around them."""

  def __init__(self, model, tok, defaults: dict[str, Any], model_name: str, *,
               batch_size: int = 16, window_s: float = 0.01, stream_steps: bool = False):
    self.model, self.tok, self.defaults = model, tok, dict(defaults)
    self.model_name, self.batch_size = model_name, batch_size
    self.created = int(time.time())
    self.batcher = Batcher(model, tok, batch_size, window_s, stream_steps)

  def parse(self, kind: str, body: Any) -> Job:
    return parse_request(kind, body, self.tok, self.model.config, self.defaults,
                         self.model_name, self.batch_size)

  def models(self) -> dict:
    cfg = self.model.config
    return {"object": "list", "data": [{
        "id": self.model_name, "object": "model", "created": self.created,
        "owned_by": "llada_jax",
        "meta": {"family": cfg.family, "max_sequence_length": cfg.max_sequence_length,
                 "batch_size": self.batch_size, "defaults": self.defaults,
                 **self.batcher.stats}}]}

  def http_server(self, host: str = "127.0.0.1", port: int = 8000
                  ) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server (not yet serving) of this Server's endpoints."""
    handler = type("Handler", (_Handler,), {"server_state": self})
    return _HTTPServer((host, port), handler)

  def close(self) -> None:
    self.batcher.close()


def error_body(message: str, param: str | None = None,
               kind: str = "invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _usage(job: Job) -> dict:
  completion = sum(c.tokens for c in job.choices)
  return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
          "total_tokens": job.prompt_tokens + completion}


def response_body(job: Job, rid: str, created: int, model: str) -> dict:
  """The non-streamed OpenAI response of a finished job."""
  if job.kind == "chat":
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": None, "finish_reason": c.finish_reason} for c in job.choices]
    kind = "chat.completion"
  else:
    choices = [{"index": c.index, "text": c.text, "logprobs": None,
                "finish_reason": c.finish_reason} for c in job.choices]
    kind = "text_completion"
  return {"id": rid, "object": kind, "created": created, "model": model,
          "choices": choices, "usage": _usage(job), "system_fingerprint": None}


def chunk_body(job: Job, rid: str, created: int, model: str, index: int | None,
               text: str | None = None, reason: str | None = None, role: bool = False,
               usage: bool = False) -> dict:
  """One streamed chunk: a role, a text delta or a finish_reason of choice `index`
  (or, with usage=True, the usage chunk: no choices)."""
  if job.kind == "chat":
    delta = {"role": "assistant", "content": ""} if role else (
        {"content": text} if text is not None else {})
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    kind = "chat.completion.chunk"
  else:
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    kind = "text_completion"
  out = {"id": rid, "object": kind, "created": created, "model": model,
         "choices": [] if usage else [choice], "system_fingerprint": None}
  if usage:
    out["usage"] = _usage(job)
  return out


class _HTTPServer(http.server.ThreadingHTTPServer):
  """A thread per connection, with a listen backlog for many concurrent clients
  (the standard library's 5 resets connections under load)."""
  daemon_threads = True
  request_queue_size = 128


class _Handler(http.server.BaseHTTPRequestHandler):
  """The HTTP endpoints; `server_state` is the Server."""
  server_state: Server
  protocol_version = "HTTP/1.1"
  ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.debug("%s " + format, self.address_string(), *args)

  def _json(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):  # pylint: disable=invalid-name
    path = self.path.split("?")[0].rstrip("/")
    if path == "/v1/models":
      self._json(200, self.server_state.models())
    elif path == "/health":
      self._json(200, {"status": "ok"})
    else:
      self._json(404, error_body(f"no route GET {path}; see /v1/models"))

  def do_POST(self):  # pylint: disable=invalid-name
    path = self.path.split("?")[0].rstrip("/")
    length = int(self.headers.get("Content-Length") or 0)
    raw = self.rfile.read(length)
    if path not in self.ROUTES:
      self._json(404, error_body(f"no route POST {path}; the endpoints are "
                                 f"{', '.join(self.ROUTES)}"))
      return
    try:
      body = json.loads(raw or b"null")
    except ValueError as e:
      self._json(400, error_body(f"the request body is not JSON: {e}"))
      return
    state = self.server_state
    try:
      job = state.parse(self.ROUTES[path], body)
    except BadRequest as e:
      self._json(400, error_body(str(e), e.param))
      return
    rid = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    state.batcher.submit(job)
    if job.stream:
      try:
        self._stream(job, rid, created)
      except (BrokenPipeError, ConnectionResetError):
        log.info("a client left while its completion streamed")
      return
    event = _wait_done(job)
    if event is not None:
      self._json(500, error_body(event, kind="server_error"))
      return
    self._json(200, response_body(job, rid, created, state.model_name))

  def _stream(self, job: Job, rid: str, created: int) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
    name = self.server_state.model_name
    send = lambda body: self._event(json.dumps(body))
    if job.kind == "chat":
      for c in job.choices:
        send(chunk_body(job, rid, created, name, c.index, role=True))
    while True:
      kind, index, value = job.events.get()
      if kind == "delta":
        send(chunk_body(job, rid, created, name, index, text=value))
      elif kind == "finish":
        send(chunk_body(job, rid, created, name, index, reason=value))
      elif kind == "error":
        send(error_body(value, kind="server_error"))
        break
      else:
        if job.include_usage:
          send(chunk_body(job, rid, created, name, None, usage=True))
        break
    self._event("[DONE]")

  def _event(self, data: str) -> None:
    self.wfile.write(f"data: {data}\n\n".encode())
    self.wfile.flush()


def _wait_done(job: Job) -> str | None:
  """Waits for a non-streamed job: None when done, else the error message."""
  while True:
    kind, _, value = job.events.get()
    if kind == "done":
      return None
    if kind == "error":
      return value


# --- the command line -----------------------------------------------------------------------


@errors.report_errors("python -m llada_jax.serve")
def main(argv: Sequence[str] | None = None) -> int:
  parser = chat.front_end_parser("python -m llada_jax.serve", __doc__.split("\n\n")[0])
  chat.add_server_flags(parser, 8000)
  parser.add_argument("--model_name", help="the model id clients name (default: the "
                      "--checkpoint directory's name)")
  parser.add_argument("--batch_size", type=int, default=16, help="rows per sampler call")
  parser.add_argument("--batch_window_ms", type=float, default=10.,
                      help="how long the worker waits for more requests to batch")
  parser.add_argument("--stream_steps", action="store_true",
                      help="stream a chunk per denoising step instead of per block")
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error(f"--batch_size: expected a positive integer, got {args.batch_size}")
  if args.batch_window_ms < 0:
    parser.error(f"--batch_window_ms: expected >= 0, got {args.batch_window_ms}")
  model, tok, defaults = chat.load_front_end(parser, args)
  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  server = Server(model, tok, defaults, name, batch_size=args.batch_size,
                  window_s=args.batch_window_ms / 1000, stream_steps=args.stream_steps)
  httpd = server.http_server(args.host, args.port)
  print(f"serving {name} on http://{args.host}:{httpd.server_address[1]}/v1", flush=True)
  try:
    httpd.serve_forever()
  finally:
    httpd.server_close()
    server.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
