"""Web demo (Gradio): chat plus the denoising animation of the sampler (SPEC §6).

  python -m llada_jax.app --checkpoint DIR [--host 127.0.0.1] [--port 7860] [sampler flags]

Each answer is sampled once with `generate_stream(..., trace=True)`: the chat
and the denoising panel update as each block commits; the animation then
replays the whole trace: masked positions grey, the tokens a step reveals coloured
by their confidence (< 0.3 red, < 0.7 orange, else green), earlier ones blue.
It plays once after each answer ("Replay" plays it again) and the step slider
scrubs through the frames. "Fixed words" puts words at
positions of the answer (`3: the, 10: end`, counted from the start of the
generated part), imposed every step through generate's `constraints`.
Needs the `app` extra (gradio).
"""

from __future__ import annotations

import html
import sys
from typing import Any, Iterator, Sequence

import gradio as gr
import numpy as np

from llada_jax import errors
from llada_jax.frontends import chat
from llada_jax.sampling import sampler as sampling

MASK_COLOR, OLD_COLOR = "#d0d0d0", "#9ecbff"
# Client-side replay of the frames, one every 120 ms, ending on the last.
PLAY_JS = """() => {
  const frames = [...document.querySelectorAll('#frames .llada-frame')];
  frames.forEach((f, j) => { setTimeout(() => frames.forEach(
      (g, k) => { g.style.display = k === j ? '' : 'none'; }), 120 * j); });
}"""


def confidence_color(c: float) -> str:
  return "#ff8a8a" if c < 0.3 else "#ffc46b" if c < 0.7 else "#8fe39a"


def parse_constraints(text: str, tok, gen_length: int) -> dict[int, int]:
  """`"pos: word, pos: word"` -> {position in the answer: token id}; a word of
  several tokens fills consecutive positions. ValueError names the bad entry."""
  out: dict[int, int] = {}
  for entry in filter(None, (e.strip() for e in text.split(","))):
    pos, sep, word = entry.partition(":")
    if not sep or not pos.strip().isdigit() or not word.strip():
      raise ValueError(f"fixed words: {entry!r} is not 'position: word'")
    ids = tok.encode((" " if int(pos) else "") + word.strip())
    for i, token in enumerate(ids):
      if int(pos) + i >= gen_length:
        raise ValueError(f"fixed words: {entry!r} runs past gen_length={gen_length}")
      out[int(pos) + i] = token
  return out


def frames_html(trace: sampling.Trace, tok, mask_id: int, shown: int) -> str:
  """HTML of every frame of a one-row answer trace (canvas_SBL [S, 1, G]), frame
  `shown` (1-based) visible; one `div.llada-frame` per step."""
  canvas_SG = np.asarray(trace.canvas_SBL)[:, 0]
  conf_G, step_G = np.asarray(trace.confidence_BL)[0], np.asarray(trace.step_BL)[0]
  frames = []
  for s, row in enumerate(canvas_SG):
    spans = []
    for i, token in enumerate(row):
      if token == mask_id:
        color, text = MASK_COLOR, "\u2591"
      else:
        color = confidence_color(float(conf_G[i])) if step_G[i] == s else OLD_COLOR
        text = html.escape(tok.decode([int(token)], skip_special=False)) or "\u2423"
      spans.append(f'<span style="background:{color};padding:1px 2px;margin:1px;'
                   f'border-radius:3px;display:inline-block">{text}</span>')
    hidden = "" if s + 1 == shown else "display:none;"
    frames.append(f'<div class="llada-frame" data-step="{s + 1}" style="{hidden}'
                  f'font-family:monospace;line-height:1.9">{"".join(spans)}</div>')
  return f'<div id="llada-frames">{"".join(frames)}</div>'


def traced(cfg) -> bool:
  """Whether answers come with the denoising trace: block-diffusion generate (llada2)
  records none."""
  return cfg.family != "llada2"


def answer_stream(model, tok, settings: dict[str, Any], message: str, history: Sequence[int],
                  turns: int, fixed_words: str = ""
                  ) -> tuple[chat.Conversation, Iterator[chat.Partial | chat.Reply]]:
  """One turn of a browser session with the sidebar's `settings` -> (the session's
  Conversation, the turn's items: a `chat.Partial` per committed block, then the
  `chat.Reply`; traces when `traced`). ValueError on bad input."""
  conv = chat.Conversation(model, tok, settings)
  conv.history, conv.turns = list(history), int(turns)
  conv.too_long_hint = "Press Reset to start over, or lower gen_length."
  constraints = parse_constraints(fixed_words or "", tok, int(settings["gen_length"]))
  return conv, conv.stream(message, trace=traced(model.config), constraints=constraints or None)


def answer(model, tok, settings: dict[str, Any], message: str, history: Sequence[int],
           turns: int, fixed_words: str = "") -> tuple[chat.Conversation, chat.Reply]:
  """`answer_stream`'s turn run to its end -> (the Conversation after it, the reply)."""
  conv, items = answer_stream(model, tok, settings, message, history, turns, fixed_words)
  *_, reply = items
  return conv, reply


def build(model, tok, settings: dict[str, Any]) -> gr.Blocks:
  """The Gradio app around `model` (one Conversation per browser session)."""
  cfg = model.config
  limit = cfg.max_sequence_length

  def respond(message, messages, history, turns, gen_length, steps, block_length,
              temperature, cfg_scale, remasking, fixed_words):
    if not message.strip():
      raise gr.Error("type a message first")
    turn_settings = {**settings, "gen_length": int(gen_length), "steps": int(steps),
                     "block_length": int(block_length), "temperature": float(temperature),
                     "cfg_scale": float(cfg_scale), "remasking": remasking}
    asked = list(messages) + [{"role": "user", "content": message}]
    try:
      conv, items = answer_stream(model, tok, turn_settings, message, history, turns,
                                  fixed_words)
      for item in items:
        n = len(item.trace.canvas_SBL) if item.trace is not None else 1
        shown = asked + [{"role": "assistant", "content": item.text}]
        frames = (frames_html(item.trace, tok, cfg.mask_token_id, n) if item.trace is not None
                  else "(no denoising trace: block-diffusion models decode block by block)")
        if isinstance(item, chat.Partial):  # a block committed: show it
          yield ("", shown, gr.update(), gr.update(), frames, gr.update(maximum=n, value=n),
                 gr.update(), f"denoising: {n} steps so far" if traced(cfg) else "decoding")
    except ValueError as e:
      raise gr.Error(str(e)) from e
    yield ("", shown, conv.history, conv.turns, frames, gr.update(maximum=n, value=n),
           item.trace, f"{item.new_tokens} tokens in {item.seconds:.1f} s"
           + (f", {n} steps" if traced(cfg) else "") + f"; history {len(conv.history)}/{limit} tokens")

  def scrub(step, trace):
    if trace is None:
      return gr.update()
    return frames_html(trace, tok, cfg.mask_token_id, int(step))

  with gr.Blocks(title="LLaDA") as demo:
    gr.Markdown("# LLaDA — masked-diffusion chat\nEach answer is denoised from all-masked; "
                "the panel replays the steps.")
    history, turns, trace = gr.State([]), gr.State(0), gr.State(None)
    with gr.Row():
      with gr.Column(scale=3):
        chatbot = gr.Chatbot(label="Chat", height=300, elem_id="chatbot")
        box = gr.Textbox(label="Message", elem_id="message")
        with gr.Row():
          send = gr.Button("Send", variant="primary", elem_id="send")
          reset = gr.Button("Reset")
        frames = gr.HTML(label="Denoising", elem_id="frames")
        play = gr.Button("Replay the denoising", elem_id="play", size="sm")
        step = gr.Slider(1, max(1, settings["steps"]), value=1, step=1, label="Step",
                         elem_id="step")
        status = gr.Markdown(elem_id="status")
      with gr.Column(scale=1):
        gen_length = gr.Slider(1, limit // 2, value=settings["gen_length"], step=1,
                               label="gen_length")
        steps = gr.Slider(1, limit // 2, value=settings["steps"], step=1, label="steps")
        block_length = gr.Slider(1, limit // 2, value=settings["block_length"], step=1,
                                 label="block_length")
        temperature = gr.Slider(0, 2, value=settings["temperature"], step=0.05,
                                label="temperature")
        cfg_scale = gr.Slider(0, 5, value=settings["cfg_scale"], step=0.1, label="cfg_scale")
        remasking = gr.Dropdown(list(sampling.REMASKING), value=settings["remasking"],
                                label="remasking")
        fixed = gr.Textbox(label="Fixed words (position: word, ...)", placeholder="0: The")
    inputs = [box, chatbot, history, turns, gen_length, steps, block_length, temperature,
              cfg_scale, remasking, fixed]
    outputs = [box, chatbot, history, turns, frames, step, trace, status]
    send.click(respond, inputs, outputs).then(None, js=PLAY_JS)
    box.submit(respond, inputs, outputs).then(None, js=PLAY_JS)
    play.click(None, js=PLAY_JS)
    step.change(scrub, [step, trace], frames)
    reset.click(lambda: ([], [], 0, "", None, ""), None,
                [chatbot, history, turns, frames, trace, status])
  return demo


@errors.report_errors("python -m llada_jax.app")
def main(argv: Sequence[str] | None = None) -> int:
  parser = chat.front_end_parser("python -m llada_jax.app", __doc__.split("\n\n")[0])
  chat.add_server_flags(parser, 7860)
  args = parser.parse_args(argv)
  model, tok, settings = chat.load_front_end(parser, args)
  build(model, tok, settings).queue().launch(server_name=args.host, server_port=args.port)
  return 0


if __name__ == "__main__":
  sys.exit(main())
