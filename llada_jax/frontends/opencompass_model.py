"""OpenCompass model `llada_jax` (opencompass 0.5.x): LLaDA on OpenCompass's
likelihood (PPL / LL) and generation tasks, with the lm-eval model's settings.

In an OpenCompass config (a Python file run by `opencompass CONFIG`):

  from llada_jax.frontends.opencompass_model import LLaDAJax
  models = [dict(type=LLaDAJax, abbr="llada-8b-instruct", path="GSAI-ML/LLaDA-8B-Instruct",
                 mc_num=128, gen_length=256, steps=256, block_length=32,
                 batch_size=8, max_out_len=256, run_cfg=dict(num_gpus=0))]

`path` is the model (a directory or a Hub id, as lm-eval's `checkpoint`);
`max_seq_len` is lm-eval's `max_length`; every other keyword is an lm-eval model
arg of `frontends/evaluate.py` (mc_num, mc_batch_size, cfg, seed, dtype, mesh,
padding, and generate's settings under their own names), checked the same way.
OpenCompass's `batch_size` is the number of requests run together: each of its
batches is one batched call (scored or generated), padded as `padding` says.

- `get_loglikelihood(inputs, conts)`: the lm-eval model's `loglikelihood`
  (the Monte Carlo ELBO of log p(cont | input without cont)), as an array.
- `get_ppl(inputs, mask_length)`: the mean negative ELBO per token of each input
  after its first mask_length[i] tokens (the context); without mask_length, of
  the whole input after a one-token prefix (BOS, else EOS), as lm-eval's
  `loglikelihood_rolling` scores text. An upper bound on the mean NLL.
- `generate(inputs, max_out_len, stopping_criteria)`: the lm-eval model's
  `generate_until`, `stopping_criteria` as its `until`; OpenCompass's
  `generation_kwargs` (model config) and call kwargs named like generate's
  arguments override the settings. `max_out_len` is ignored as lm-eval's
  `max_gen_toks` is: the canvas is gen_length.

`OpenCompassLLaDA` holds these methods without OpenCompass itself; `LLaDAJax`
(registered in OpenCompass's MODELS as "llada_jax") adds its `BaseModel` and
exists when opencompass is installed (the `opencompass` extra).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lm_eval.api.instance import Instance

from llada_jax.frontends import evaluate

try:
  from opencompass.models.base import BaseModel
  from opencompass.registry import MODELS
except ImportError:  # opencompass not installed: OpenCompassLLaDA only
  BaseModel = MODELS = None


class OpenCompassLLaDA:
  """OpenCompass's model methods over the lm-eval model (see the module docstring)."""

  def __init__(self, path: str, max_seq_len: int | None = None,
               generation_kwargs: dict[str, Any] | None = None, **model_args):
    self.lm = evaluate.LLaDAEval(checkpoint=path, max_length=max_seq_len, **model_args)
    self.generation_kwargs = dict(generation_kwargs or {})

  def _batch_of(self, n: int) -> None:
    self.lm.batch_size = max(1, n)  # one OpenCompass batch = one call

  def get_token_len(self, prompt: str) -> int:
    return len(self.lm.tok.encode(prompt))

  def encode(self, prompt: str) -> list[int]:
    return self.lm.tok.encode(prompt)

  def decode(self, tokens: Sequence[int]) -> str:
    return self.lm.tok.decode(tokens)

  def get_loglikelihood(self, inputs: list[str], conts: list[str]) -> np.ndarray:
    """ELBO estimates of log p(cont | context), each input being context + cont."""
    requests = []
    for n, (text, cont) in enumerate(zip(inputs, conts)):
      if not text.endswith(cont):
        raise ValueError(f"get_loglikelihood: input {n} does not end with its "
                         f"continuation {cont!r}")
      requests.append(Instance("loglikelihood", {}, (text[:len(text) - len(cont)], cont), n))
    self._batch_of(len(requests))
    return np.asarray([score for score, _ in self.lm.loglikelihood(requests)])

  def get_ppl(self, inputs: list[str], mask_length: list[int] | None = None) -> np.ndarray:
    """Mean negative ELBO per token after the first mask_length[i] tokens."""
    pairs = []
    for n, text in enumerate(inputs):
      ids = self.lm.tok.encode(text)
      cut = mask_length[n] if mask_length is not None else 0
      context, answer = (ids[:cut], ids[cut:]) if cut else ([self.lm.prefix_id], ids)
      if not answer:
        raise ValueError(f"get_ppl: input {n} has no tokens after its first {cut}")
      pairs.append((self.lm._fit(context, answer, self.lm.max_length), answer))  # pylint: disable=protected-access
    self._batch_of(len(pairs))
    scores = self.lm.score_pairs(pairs, "get_ppl")
    return -scores / np.asarray([len(a) for _, a in pairs], np.float64)

  def generate(self, inputs: list[str], max_out_len: int | None = None,
               stopping_criteria: Sequence[str] = (), **kwargs) -> list[str]:
    """Completions of `inputs`, cut at EOS / EoT and the stopping criteria."""
    del max_out_len  # the canvas is gen_length, as lm-eval's max_gen_toks
    gen_kwargs = {**self.generation_kwargs, **kwargs, "until": list(stopping_criteria)}
    requests = [Instance("generate_until", {}, (text, gen_kwargs), n)
                for n, text in enumerate(inputs)]
    self._batch_of(len(requests))
    return self.lm.generate_until(requests)


if BaseModel is not None:

  @MODELS.register_module(name=evaluate.MODEL_NAME)
  class LLaDAJax(OpenCompassLLaDA, BaseModel):
    """The OpenCompass model (`BaseModel`; see the module docstring)."""

    def __init__(self, path: str, max_seq_len: int | None = None,
                 tokenizer_only: bool = False, meta_template: dict | None = None,
                 generation_kwargs: dict[str, Any] | None = None, sync_rank: bool = False,
                 **model_args):
      if tokenizer_only:
        raise ValueError("llada_jax: tokenizer_only is not supported (the model is loaded)")
      OpenCompassLLaDA.__init__(self, path, max_seq_len, generation_kwargs, **model_args)
      BaseModel.__init__(self, path=path, max_seq_len=self.lm.max_length,
                         meta_template=meta_template, generation_kwargs=self.generation_kwargs,
                         sync_rank=sync_rank)
