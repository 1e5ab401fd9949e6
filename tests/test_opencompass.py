"""The OpenCompass model's methods against the library (likelihood and generation with
the lm-eval model's settings), and, where opencompass is installed, the registered
`BaseModel` through OpenCompass's own inferencers."""

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import llada_jax  # noqa: E402
from llada_jax.frontends import opencompass_model  # noqa: E402
from llada_jax.frontends import settings as settings_lib  # noqa: E402

SMALL = dict(mc_num=4, mc_batch_size=2, steps=4, gen_length=8, block_length=4, seed=3,
             padding="longest")


@pytest.fixture(scope="module")
def model(fixture_dir):
  return opencompass_model.OpenCompassLLaDA(fixture_dir, **SMALL)


def _elbo(m, context, answer):
  return llada_jax.log_likelihood(m.lm.model, [context], [answer], mc_num=4, batch_size=2,
                                  rng=3)[0]


def test_loglikelihood_is_the_elbo_of_the_continuation(model):
  tok = model.lm.tok
  pair = model.get_loglikelihood(["The cat sat on the mat", "A dog"], [" the mat", " dog"])
  assert isinstance(pair, np.ndarray) and pair.shape == (2,)
  context = tok.encode("The cat sat on")  # the trailing space moves to the continuation
  want = _elbo(model, context, tok.encode("The cat sat on the mat")[len(context):])
  np.testing.assert_allclose(model.get_loglikelihood(["The cat sat on the mat"], [" the mat"]),
                             [want], rtol=1e-5)
  with pytest.raises(ValueError, match="does not end with its continuation"):
    model.get_loglikelihood(["abc"], ["x"])


def test_ppl_is_the_mean_negative_elbo_after_the_context(model):
  tok = model.lm.tok
  text = "The cat sat on the mat"
  ids = tok.encode(text)
  # Scored alone, a request's Monte Carlo draws are log_likelihood's with rng=seed.
  got = model.get_ppl([text], mask_length=[3])
  np.testing.assert_allclose(got, [-_elbo(model, ids[:3], ids[3:]) / (len(ids) - 3)],
                             rtol=1e-5)
  whole = -_elbo(model, [model.lm.prefix_id], ids) / len(ids)  # no context: a BOS prefix
  np.testing.assert_allclose(model.get_ppl([text]), [whole], rtol=1e-5)
  assert model.get_ppl([text, text], mask_length=[3, 0]).shape == (2,)
  assert model.get_token_len(text) == len(ids)


def test_generate_is_generate_until_with_the_stopping_criteria(model):
  tok = model.lm.tok
  prompts = ["def f(x):", "Once upon a time"]
  got = model.generate(prompts, max_out_len=100, stopping_criteria=["\n"])
  args = {k: SMALL[k] for k in ("steps", "gen_length", "block_length")}
  for prompt, text in zip(prompts, got):
    ids = tok.encode(prompt)
    out = np.asarray(llada_jax.generate(model.lm.model, np.asarray(ids), **args))[len(ids):]
    stops = [i for i, t in enumerate(out.tolist()) if t in model.lm.stop_ids]
    full = tok.decode(out[:stops[0]] if stops else out)
    # Same rows batched with another prompt: the key differs per batch only (temperature 0).
    assert text == settings_lib.stop_at(full, ["\n"])


@pytest.mark.slow
def test_opencompass_ppl_and_gen_inferencers(fixture_dir, tmp_path):
  """OpenCompass's own PPL and generation inferencers on a two-question local
  dataset, with the registered model built from a config dict."""
  pytest.importorskip("opencompass", reason="opencompass is not installed (the "
                      "`opencompass` extra); its model methods are tested above")
  from datasets import Dataset, DatasetDict  # pylint: disable=g-import-not-at-top
  from opencompass.openicl.icl_inferencer import GenInferencer, PPLInferencer  # pylint: disable=g-import-not-at-top
  from opencompass.openicl.icl_prompt_template import PromptTemplate  # pylint: disable=g-import-not-at-top
  from opencompass.openicl.icl_retriever import ZeroRetriever  # pylint: disable=g-import-not-at-top
  from opencompass.openicl.icl_dataset_reader import DatasetReader  # pylint: disable=g-import-not-at-top
  from opencompass.utils.build import build_model_from_cfg  # pylint: disable=g-import-not-at-top

  m = build_model_from_cfg(dict(type="llada_jax", path=fixture_dir, batch_size=2, **SMALL))
  assert isinstance(m, opencompass_model.LLaDAJax)
  rows = [{"question": "Is the sky blue?", "answer": "A"},
          {"question": "Is fire cold?", "answer": "B"}]
  ds = DatasetDict({"test": Dataset.from_list(rows), "train": Dataset.from_list(rows)})
  reader = DatasetReader(ds, input_columns=["question"], output_column="answer")
  retriever = ZeroRetriever(reader)
  ppl = PPLInferencer(m, batch_size=2, output_json_filepath=str(tmp_path))
  labels = ppl.inference(retriever, prompt_template=PromptTemplate(
      {"A": "{question} yes", "B": "{question} no"}))
  assert len(labels) == 2 and set(labels) <= {"A", "B"}
  gen = GenInferencer(m, max_out_len=8, batch_size=2, output_json_filepath=str(tmp_path))
  texts = gen.inference(retriever, prompt_template=PromptTemplate("{question}"))
  assert texts == m.generate([r["question"] for r in rows])
