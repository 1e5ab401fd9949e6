"""The front ends' shared flags, settings check and bucketing rule."""

import argparse

import numpy as np
import pytest

from llada_jax.frontends import settings


def test_sampler_flags_carry_generate_names():
  assert set(settings.SAMPLER_ARGS) == {
      "steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking",
      "logits_eos_inf", "confidence_eos_eot_inf", "cache", "cache_refresh", "threshold",
      "factor", "stop_at_eos",
      "editing_threshold", "max_post_steps", "num_to_transfer"}  # LLaDA2.1's block sampler
  parser = argparse.ArgumentParser()
  settings.add_sampler_flags(parser)
  args = parser.parse_args(["--temperature", "0.5", "--logits_eos_inf", "--seed", "3"])
  got = settings.sampler_settings(args)
  assert got["temperature"] == 0.5 and got["logits_eos_inf"] is True
  assert got["seed"] == 3 and got["steps"] is None and got["block_length"] is None
  assert got["cache"] == "none" and got["threshold"] is None
  # unset: the model family's defaults (dense: generate's; llada2: the released ones)
  assert {k: settings.with_family_defaults(got, "llada")[k] for k in settings.FAMILY_SETTINGS
          } == {"steps": 128, "block_length": 128, "threshold": None}
  assert {k: settings.with_family_defaults(got, "llada2")[k] for k in settings.FAMILY_SETTINGS
          } == {"steps": 32, "block_length": 32, "threshold": 0.95}
  given = settings.sampler_settings(parser.parse_args(["--block_length", "16"]))
  assert settings.with_family_defaults(given, "llada2")["block_length"] == 16
  fast = settings.sampler_settings(parser.parse_args(
      ["--cache", "dual", "--cache_refresh", "4", "--threshold", "0.9", "--stop_at_eos"]))
  assert (fast["cache"], fast["cache_refresh"], fast["threshold"], fast["factor"],
          fast["stop_at_eos"]) == ("dual", 4, 0.9, None, True)
  with pytest.raises(SystemExit):
    parser.parse_args(["--cache", "kv"])


def test_check_settings(tiny_model):
  ok = {**settings.SAMPLER_ARGS, "seed": 0}
  settings.check_settings(ok)
  settings.check_settings(ok, tiny_model.config, 512 - ok["gen_length"])
  for changes, message in (({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
                           ({"stop_at_eos": 1}, "stop_at_eos"),
                           ({"block_length": 3}, "block_length")):
    with pytest.raises(ValueError, match=message):
      settings.check_settings({**ok, **changes})
  with pytest.raises(ValueError, match="exceeds max_sequence_length=512"):
    settings.check_settings(ok, tiny_model.config, 512 - ok["gen_length"] + 1)


def test_check_settings_follows_the_model_family(tiny_model):
  """A block-diffusion (llada2) config gets its sampler's rules: dense-only settings
  refused, steps per block (no multiple of the blocks needed)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from llada_jax.checkpoints import layout  # pylint: disable=g-import-not-at-top
  cfg = layout.read_config(str(pathlib.Path(__file__).parent / "fixtures" / "llada2_tiny"),
                           mask_token_id=995)
  ok = {**settings.SAMPLER_ARGS, "seed": 0, "gen_length": 16, "block_length": 8, "steps": 3}
  settings.check_settings(ok, cfg, 4)
  with pytest.raises(ValueError, match="multiple of the number of blocks"):
    settings.check_settings(ok, tiny_model.config, 4)
  with pytest.raises(ValueError, match="cfg_scale: .*block-diffusion"):
    settings.check_settings({**ok, "cfg_scale": 1.0}, cfg, 4)
  with pytest.raises(ValueError, match="max_sequence_length=512"):
    settings.check_settings(ok, cfg, 500)


def test_bucket_length():
  assert [settings.bucket_length(n) for n in (1, 16, 17, 33, 64, 65, 100, 129, 4000)] == \
      [16, 16, 32, 64, 64, 128, 128, 256, 4096]
  assert settings.bucket_length(1, 384, floor=64) == 64
  assert settings.bucket_length(65, 384, floor=64) == 128
  assert settings.bucket_length(300, 384) == 384  # capped by the context
  assert settings.bucket_length(384, 384) == 384
  with pytest.raises(ValueError, match="prompt length 385 exceeds the limit 384"):
    settings.bucket_length(385, 384)
  # Few programs: every length up to 4096 lands in one of 9 buckets.
  assert len({settings.bucket_length(n) for n in range(1, 4097)}) == 9


def test_bucket_rows():
  assert [settings.bucket_rows(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
  assert [settings.bucket_rows(n, 12) for n in (5, 9, 12)] == [8, 12, 12]


def test_left_pad():
  ids, mask = settings.left_pad([[5, 6], [7]], 4, pad_id=0, num_rows=3)
  np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 0, 7]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])
  assert settings.left_pad([[1, 2]], 2, pad_id=0)[1] is None
