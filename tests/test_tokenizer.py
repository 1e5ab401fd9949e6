"""Tokenizer: HF tokenizer.json and a trained SentencePiece model behind one interface."""

import json
import os

import pytest
from pydoc_data import topics

from llada_jax import tokenizer as tokenizer_lib
from llada_jax.config import config_from_model_dir

TEXT = "Hello  world\n\tdef f(x):\n    return x ** 2  # ü 日本"
MESSAGES = [{"role": "user", "content": "  What is 2+2?\n"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]


def _rendered(messages):
  """SPEC §2's template as text (BOS only before the first message)."""
  out = "<|startoftext|>"
  for m in messages:
    out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
  return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("sp")
  corpus = out / "corpus.txt"
  corpus.write_text("\n".join(list(topics.topics.values())[:200]), encoding="utf-8")
  tokenizer_lib.main(["train", "--input", str(corpus), "--vocab_size", "1200",
                      "--output", str(out / "tok")])
  return str(out / "tok")


def test_hf_tokenizer_ids_and_round_trip(fixture_dir):
  tok = tokenizer_lib.load_tokenizer(fixture_dir)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (989, 990, 990, 996)
  assert (tok.start_header_id, tok.end_header_id, tok.eot_id) == (997, 998, 999)
  assert tok.vocab_size == 1000
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  # Special strings become ids; ids beyond the vocabulary (spare logit columns) are dropped.
  assert tok.encode("a<|eot_id|>b")[1] == 999
  assert tok.decode(ids + [999, 996, 1010]) == TEXT
  assert tok.decode(ids + [999], skip_special=False) == TEXT + "<|eot_id|>"


def test_hf_chat_template_matches_rendered_template(fixture_dir):
  tok = tokenizer_lib.load_tokenizer(os.path.join(fixture_dir, "tokenizer.json"))
  ids = tok.apply_chat_template(MESSAGES)
  assert ids == tok.encode(_rendered(MESSAGES))
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
  assert tok.decode(ids, skip_special=False) == _rendered(MESSAGES)
  # The template in the fixture's tokenizer_config.json is the one we write for new tokenizers.
  with open(os.path.join(fixture_dir, "tokenizer_config.json")) as f:
    assert json.load(f)["chat_template"] == tokenizer_lib.CHAT_TEMPLATE
  no_prompt = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=False)
  assert no_prompt[-1] == tok.eot_id


def test_trained_sentencepiece_reserves_ids_and_round_trips(sp_dir):
  tok = tokenizer_lib.load_tokenizer(sp_dir)
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (1, 2, 2, 3)
  assert (tok.start_header_id, tok.end_header_id, tok.eot_id) == (4, 5, 6)
  assert 300 < tok.vocab_size <= 1200
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT  # byte fallback + identity normalisation: exact
  assert max(ids) < tok.vocab_size and not set(ids) & {1, 2, 3}
  ids = tok.apply_chat_template(MESSAGES)
  assert tok.decode(ids, skip_special=False) == _rendered(MESSAGES)
  assert ids == [1] + tok.encode(_rendered(MESSAGES)[len("<|startoftext|>"):])
  # The written tokenizer_config.json gives a model directory its ids (SPEC §2 order).
  with open(os.path.join(sp_dir, "config.json"), "w") as f:
    json.dump({"model_type": "llada", "d_model": 64, "n_heads": 4, "n_layers": 2,
               "vocab_size": 1200}, f)
  cfg = config_from_model_dir(sp_dir)
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id, cfg.eot_token_id) == (3, 2, 1, 6)


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  (tmp_path / "a.txt").write_text("some text\n")
  with pytest.raises(ValueError, match="--vocab_size"):
    tokenizer_lib.train([str(tmp_path / "a.txt")], 100, str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match="--input"):
    tokenizer_lib.train([str(tmp_path / "missing.txt")], 1000, str(tmp_path / "o"))
  with pytest.raises(SystemExit):
    tokenizer_lib.main(["train", "--input", str(tmp_path / "missing.txt"),
                        "--vocab_size", "1000", "--output", str(tmp_path / "o")])
