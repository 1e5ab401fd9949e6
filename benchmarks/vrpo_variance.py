"""The variance of VRPO's preference-score estimator (LLaDA 1.5, arXiv 2505.19223 §4).

  python -m benchmarks.vrpo_variance [--draws 256] [--pairs 8] [--output out/vrpo_variance.json]

The score ŝ = (B̂_θ(y_w) − B̂_ref(y_w)) − (B̂_θ(y_l) − B̂_ref(y_l)) (the margin at
β = 1; ELBOs in nats per answer token) is estimated --draws times with
independent noise for each of --pairs fixed preference pairs, and its variance
over the draws is averaged over the pairs, for a budget of n = 1, 4, 8 samples
per ELBO, optimal (n timesteps, one mask each) or naive (one timestep, n
masks) allocation, with and without antithetic sampling. Every setting costs
the same forwards (2 answers x n rows per model).

Models: the reference is the tiny fixture (tests/fixtures/llada_tiny); the
policy is that model with every weight moved by 5% of its tensor's standard
deviation (a policy some steps into training: near, not equal, to the
reference). Pairs: prompts and answers cut from Python's documentation. Fixed
seeds: the numbers are reproducible. Not a timing benchmark. JSON + a
markdown table on stdout.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import common
import llada_jax
from llada_jax import tokenizer as tokenizer_lib
from llada_jax.training import data as data_lib
from llada_jax.training import vrpo

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                       "fixtures", "llada_tiny")
BUDGETS = (1, 4, 8)
SETTINGS = [(a, anti) for a in ("optimal", "naive") for anti in (True, False)]


def _define_flags():
  flags.DEFINE_integer("draws", 256, "Independent estimates per pair and setting.")
  flags.DEFINE_integer("pairs", 8, "Preference pairs (variance averaged over them).")
  flags.DEFINE_integer("seq_len", 48, "Row length (prompt + answer + EOS padding).")
  flags.DEFINE_integer("seed", 0, "Seed of the pairs, the policy's shift and the noise.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def make_pairs(tok, num: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """A batch of `num` preference rows: a documentation sentence's start as the prompt,
  its continuation (chosen) or another sentence's (rejected)."""
  rs = np.random.RandomState(seed)
  texts = [d["text"] for d in data_lib.documents(data_lib.PYDOC) if len(d["text"].split()) > 24]
  picks = rs.choice(len(texts), 2 * num, replace=False)
  rows = []
  for i in range(num):
    words, other = texts[picks[2 * i]].split(), texts[picks[2 * i + 1]].split()
    doc = {"prompt": " ".join(words[:8]), "chosen": " ".join(words[8:14]),
           "rejected": " ".join(other[8:14])}
    rows.append(data_lib.preference_example(doc, tok, seq_len))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def shifted(model, scale: float, seed: int):
  """`model` with each weight moved by N(0, (scale · its tensor's std)^2)."""
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  moved = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, moved))


@functools.partial(jax.jit, static_argnames=("s",))
def _scores(policy_graph, policy_state, ref_state, batch, rng, s: vrpo.Settings):
  """float32 [pairs]: one estimate of ŝ per pair (β = 1)."""
  policy = nnx.merge(policy_graph, policy_state)
  reference = nnx.merge(policy_graph, ref_state)
  noise = vrpo.draw(rng, batch, policy.config.mask_token_id, s)
  elbos, _ = vrpo.pair_elbos(policy, reference, batch, noise)
  return vrpo.preference_terms(elbos, 1.0)["reward_margin"]


def measure(policy, reference, batch, draws: int, seed: int) -> list[dict]:
  graph, policy_state = nnx.split(policy)
  ref_state = nnx.split(reference)[1]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  rows = []
  for n in BUDGETS:
    for allocation, antithetic in SETTINGS:
      s = vrpo.Settings(n_samples=n, allocation=allocation, antithetic=antithetic, beta=1.0)
      est = np.stack([np.asarray(_scores(graph, policy_state, ref_state, batch,
                                         jax.random.fold_in(jax.random.key(seed), k), s))
                      for k in range(draws)])  # [draws, pairs]
      rows.append({"n": n, "allocation": allocation, "antithetic": antithetic,
                   "variance": float(est.var(axis=0, ddof=1).mean()),
                   "mean_score": float(est.mean()),
                   "mean_score_stderr": float(est.mean(axis=1).std(ddof=1) / np.sqrt(draws))})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def table(rows: list[dict]) -> str:
  by = {(r["n"], r["allocation"], r["antithetic"]): r["variance"] for r in rows}
  head = "| n | " + " | ".join(f"{a}, antithetic {'on' if t else 'off'}" for a, t in SETTINGS)
  lines = [head + " |", "|---" * (len(SETTINGS) + 1) + "|"]
  for n in BUDGETS:
    lines.append(f"| {n} | " + " | ".join(f"{by[(n, a, t)]:.3g}" for a, t in SETTINGS) + " |")
  return "\n".join(lines)


def run(draws: int, pairs: int, seq_len: int, seed: int) -> dict:
  reference = llada_jax.load(FIXTURE)
  policy = shifted(reference, 0.05, seed)
  batch = make_pairs(tokenizer_lib.load_tokenizer(FIXTURE), pairs, seq_len, seed)
  rows = measure(policy, reference, batch, draws, seed)
  return {"model": "tests/fixtures/llada_tiny (reference); +5% weight noise (policy)",
          "draws": draws, "pairs": pairs, "seq_len": seq_len, "seed": seed,
          "quantity": "Var of (B_pol(y_w) - B_ref(y_w)) - (B_pol(y_l) - B_ref(y_l)), "
                      "nats^2 per answer token^2, mean over pairs",
          "rows": rows, "table": table(rows), "machine": common.machine()}


def main(argv):
  del argv
  f = flags.FLAGS
  result = run(f.draws, f.pairs, f.seq_len, f.seed)
  common.write_json(result, f.output)
  print(result["table"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
