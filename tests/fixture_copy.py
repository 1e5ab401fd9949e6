"""Test helpers: the module fixtures of a fixture checkpoint; a copy of one with its
config.json edited; a small Ling-like tokenizer (LLaDA2's special tokens) for the LLaDA2 fixture, which has none."""

import json
import pathlib
import shutil

import numpy as np
import pytest

import llada_jax


def checkpoint_fixtures(directory: pathlib.Path, mask_token_id: int):
  """Module-scoped fixtures of a fixture checkpoint: (its reference.npz arrays, the
  model loaded); the names they are assigned to in a test module are their names."""

  @pytest.fixture(scope="module")
  def reference():
    return dict(np.load(directory / "reference.npz"))

  @pytest.fixture(scope="module")
  def loaded_model():
    return llada_jax.load(str(directory), mask_token_id=mask_token_id)

  return reference, loaded_model


def copy_with_config(src: pathlib.Path, dst: pathlib.Path, **changes) -> str:
  """Copies `src` to `dst`, setting config.json keys (None deletes one); -> dst."""
  shutil.copytree(src, dst)
  hf = json.loads((dst / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  (dst / "config.json").write_text(json.dumps(hf))
  return str(dst)


def ling_like_tokenizer(directory) -> str:
  """A small byte-level BPE tokenizer.json with LLaDA2's special tokens."""
  from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["What is two plus two? Four. Be brief, you are helpful."] * 4,
                          trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"])
  path = str(directory / "tokenizer.json")
  tok.save(path)
  return path
