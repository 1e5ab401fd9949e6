"""LLaDA2.1's editing settings through every front end, with `generate`'s names.

A copy of the LLaDA2 fixture with a small Ling-like tokenizer (the fixture has
none) and the fixture README's mask id in its config.json runs the CLI, chat, the web demo's turn
and the lm-eval model's settings; dense models refuse the settings by name.
"""

import pathlib

import numpy as np
import pytest

import llada_jax
from fixture_copy import copy_with_config, ling_like_tokenizer
from llada_jax import models, sample
from llada_jax.checkpoints import layout
from llada_jax.frontends import chat, cli
from llada_jax.frontends import settings as settings_lib
from llada_jax.tokenizer import load_tokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llada2_tiny"
PROMPT = "What is two plus two?"
# Two blocks (prompt block + one), few steps, LLaDA2.1 editing on.
EDITING = {"gen_length": 32, "block_length": 32, "steps": 4, "editing_threshold": 0.3,
           "max_post_steps": 3, "num_to_transfer": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
  path = pathlib.Path(copy_with_config(FIXTURE, tmp_path_factory.mktemp("llada2") / "model",
                                        mask_token_id=995))
  ling_like_tokenizer(path)
  return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
  return llada_jax.load(model_dir)


def _settings(**changes):
  return {**settings_lib.SAMPLER_ARGS, "seed": 0, **changes}


def _answer(model, ids, **settings):
  """The generated ids of `generate` on one unpadded prompt."""
  return np.asarray(llada_jax.generate(model, np.asarray(ids), **settings))[len(ids):]


@pytest.mark.slow
def test_cli_takes_the_editing_settings(model_dir, model, capsys):
  tok = load_tokenizer(model_dir)
  ids = cli.encode_request(tok, {"prompt": PROMPT}, True)
  want = _answer(model, ids, **EDITING)
  assert not np.array_equal(want, _answer(model, ids, **{**EDITING, "editing_threshold": None,
                                                         "max_post_steps": None,
                                                         "num_to_transfer": None}))
  flags = [f"--{k}={v}" for k, v in EDITING.items()]
  assert sample.main(["--checkpoint", model_dir, "--prompt", PROMPT, "--chat"] + flags) == 0
  assert capsys.readouterr().out == tok.decode(want) + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--editing_threshold", "0.5"], "editing_threshold: settings of block-diffusion models"),
    (["--num_to_transfer", "2"], "num_to_transfer: settings of block-diffusion models"),
])
def test_dense_models_refuse_the_flags_before_loading(fixture_dir, capsys, flags, message):
  with pytest.raises(SystemExit):
    sample.main(["--checkpoint", fixture_dir, "--prompt", "a"] + flags)
  assert message in capsys.readouterr().err


def test_block_models_refuse_dense_settings_and_check_their_own(model_dir, capsys):
  cfg = layout.read_config(model_dir)
  for words, message in ((["cache=dual"], "cache='dual'"), (["cfg_scale=1"], "cfg_scale"),
                         (["max_post_steps=2"], "needs editing_threshold"),
                         (["editing_threshold=0.5", "num_to_transfer=0"], "num_to_transfer")):
    with pytest.raises(ValueError, match=message):
      chat.parse_settings(words, _settings(block_length=32, gen_length=32), cfg)
  # steps need not divide into the blocks here (the dense rule): it is a per-block cap
  assert chat.parse_settings(["steps=5"], _settings(block_length=32, gen_length=64),
                             cfg)["steps"] == 5
  with pytest.raises(SystemExit):
    sample.main(["--checkpoint", model_dir, "--prompt", "a", "--cache", "dual"])
  assert "cache" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_and_the_web_demo_take_the_editing_settings(model_dir, model):
  tok = load_tokenizer(model_dir)
  settings = chat.parse_settings([f"{k}={v}" for k, v in EDITING.items()],
                                 _settings(), model.config)
  with pytest.raises(ValueError, match="editing_threshold"):
    chat.parse_settings(["editing_threshold=0.5"], _settings(),
                        llada_jax.ModelConfig())  # a dense config
  prompt = chat.Conversation(model, tok, settings).prompt_for(PROMPT)
  want = _answer(model, prompt, **EDITING)
  reply = chat.Conversation(model, tok, settings).reply(PROMPT)
  np.testing.assert_array_equal(reply.tokens_G, want)  # left-padded into its bucket
  app = pytest.importorskip("llada_jax.frontends.app")
  conv, shown = app.answer(model, tok, settings, PROMPT, [], 0)
  np.testing.assert_array_equal(shown.tokens_G, want)
  assert shown.trace is None and conv.turns == 1


def test_lm_eval_model_args_take_the_editing_settings(model_dir, fixture_dir):
  evaluate = pytest.importorskip("llada_jax.frontends.evaluate")
  _, gen = evaluate.parse_model_args({"checkpoint": model_dir, **EDITING})
  assert {k: gen[k] for k in EDITING} == EDITING
  with pytest.raises(ValueError, match="editing_threshold: settings of block-diffusion"):
    evaluate.parse_model_args({"checkpoint": fixture_dir, "editing_threshold": 0.5})


def test_chat_later_turns_extend_the_llada2_template(model_dir):
  """Turn 2's prompt = history + the new turn = the template of the whole conversation."""
  tok = load_tokenizer(model_dir)
  conv = chat.Conversation(models.abstract(layout.read_config(model_dir)), tok, _settings())
  first = {"role": "user", "content": PROMPT}
  conv.history = tok.apply_chat_template([first]) + tok.encode("Four.<|role_end|>")
  assert conv.prompt_for("Be brief.") == tok.apply_chat_template(
      [first, {"role": "assistant", "content": "Four."}, {"role": "user", "content": "Be brief."}])


def test_front_ends_default_to_the_model_familys_sampler(model_dir, fixture_dir):
  """Unset steps / block_length / threshold: LLaDA2's generate's for a block model, the
  front end's dense defaults otherwise (lm-eval: generate's; chat: the reference chat's)."""
  evaluate = pytest.importorskip("llada_jax.frontends.evaluate")
  block = {"steps": 32, "block_length": 32, "threshold": 0.95}
  pick = lambda settings: {k: settings[k] for k in block}
  assert pick(evaluate.parse_model_args({"checkpoint": model_dir})[1]) == block
  assert pick(evaluate.parse_model_args({"checkpoint": fixture_dir})[1]) == {
      "steps": 128, "block_length": 128, "threshold": None}
  assert evaluate.parse_model_args({"checkpoint": model_dir, "block_length": 16}
                                   )[1]["block_length"] == 16
  parser = chat.front_end_parser("chat", "")
  for directory, want in ((model_dir, block),
                          (fixture_dir, {"steps": 128, "block_length": 32, "threshold": None})):
    _, _, got = chat.load_front_end(parser, parser.parse_args(["--checkpoint", directory]))
    assert pick(got) == want and got["gen_length"] == 128
