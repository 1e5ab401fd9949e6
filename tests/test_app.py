"""Web demo: the pure helpers, then end to end in a real headless chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from llada_jax.frontends import app
from llada_jax.sampling import sampler as sampling
from llada_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")


def test_constraints_parse_words_at_positions(fixture_dir):
  tok = load_tokenizer(fixture_dir)
  got = app.parse_constraints("0: The, 5: end", tok, 16)
  assert got[0] == tok.encode("The")[0]
  assert [got[5 + i] for i in range(len(tok.encode(" end")))] == tok.encode(" end")
  for bad in ("x: word", "3 word", "2:"):
    with pytest.raises(ValueError, match="position: word"):
      app.parse_constraints(bad, tok, 16)
  with pytest.raises(ValueError, match="past gen_length"):
    app.parse_constraints("15: something longer", tok, 16)


def test_frames_follow_the_trace(tiny_model, fixture_dir):
  tok = load_tokenizer(fixture_dir)
  prompt = np.array(tok.encode("Hello"), np.int32)
  out, trace = sampling.generate(tiny_model, prompt[None], steps=8, gen_length=8,
                                 block_length=8, trace=True)
  p = len(prompt)
  trace = sampling.Trace(*(np.asarray(a)[..., p:] for a in trace))
  page = app.frames_html(trace, tok, tiny_model.config.mask_token_id, 8)
  assert page.count('class="llada-frame"') == 8
  assert page.count("display:none") == 7  # only the chosen frame shows
  # step 1 shows 7 masks, the last none
  first = page.split('class="llada-frame"')[1]
  assert first.count(app.MASK_COLOR) == 7
  last = page.split('class="llada-frame"')[-1]
  assert app.MASK_COLOR not in last
  assert np.asarray(out).shape == (1, p + 8)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian package `chromium`) here")
def test_demo_in_a_headless_browser(fixture_dir):
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  port, steps = _free_port(), 12
  proc = subprocess.Popen(
      [sys.executable, "-m", "llada_jax.app", "--checkpoint", fixture_dir, "--port", str(port),
       "--gen_length", str(steps), "--steps", str(steps), "--block_length", "4"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(url, timeout=2)
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise AssertionError(f"the app did not start:\n{proc.stdout.read()}")
        time.sleep(1)
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=CHROMIUM,
                                   args=["--headless", "--no-sandbox", "--disable-gpu"])
      page = browser.new_page(viewport={"width": 1280, "height": 1000})
      page.goto(url)
      page.locator("#message textarea").fill("What is a list?")
      page.locator("#send").click()
      # The panel fills a block (4 steps) at a time, then the status shows the turn done.
      page.wait_for_selector("#frames .llada-frame", state="attached", timeout=120_000)
      page.wait_for_selector("#status :text('tokens in')", timeout=120_000)
      assert page.locator("#frames .llada-frame").count() == steps
      assert page.locator("#chatbot").inner_text().count("What is a list?") == 1
      # the replay runs through every frame and ends on the last one alone
      page.locator("#play").click()
      page.wait_for_selector(f'#frames .llada-frame[data-step="{steps}"]', state="visible")
      visible = page.locator("#frames .llada-frame:visible")
      assert visible.count() == 1 and visible.get_attribute("data-step") == str(steps)
      # the step slider scrubs to any frame
      number = page.locator("#step input[type=number]")
      number.fill("3")
      number.press("Enter")
      page.wait_for_selector('#frames .llada-frame[data-step="3"]', state="visible")
      assert page.locator("#frames .llada-frame:visible").count() == 1
      number.fill(str(steps))
      number.press("Enter")
      page.wait_for_selector(f'#frames .llada-frame[data-step="{steps}"]', state="visible")
      os.makedirs(ARTIFACTS, exist_ok=True)
      page.screenshot(path=os.path.join(ARTIFACTS, "demo.png"), full_page=True)
      browser.close()
  finally:
    proc.terminate()
    proc.wait(timeout=30)
