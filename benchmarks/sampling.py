"""Sampling throughput: the reference's Python-loop sampler vs the compiled `generate`.

  python -m benchmarks.sampling --config configs/tiny.py [--batches 1,8]
      [--gen_lengths 64,256] [--block_length 32] [--prompt_len 32] [--output out/sampling.json]

Both samplers run the same randomly initialised model on the same prompts with
steps = gen_length (one token per step), greedy. The loop sampler is written
as the official generate.py: a jitted forward per step, then eager array ops,
and per-row top-k in a Python loop over the batch. Reports tokens/s of each,
their ratio and the compiled sampler's compile time, as JSON.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.sampling import sampler as sampling

FLAGS = flags.FLAGS


def _define_flags():
  """Flags exist only when run as a program (benchmarks.forward defines --config too)."""
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
  flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
  flags.DEFINE_list("gen_lengths", ["64", "256"], "Generation lengths.")
  flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
  flags.DEFINE_integer("repeats", 3, "Timed runs of each sampler after a warm-up.")
  flags.DEFINE_string("output", None, "Also write the JSON here.")


def loop_generate(model, prompt_BP, *, steps, gen_length, block_length):
  """The reference sampler's structure (greedy, low-confidence remasking)."""
  cfg = model.config
  mask_id = cfg.mask_token_id
  B, P = prompt_BP.shape
  x = jnp.concatenate([prompt_BP, jnp.full((B, gen_length), mask_id, jnp.int32)], axis=1)
  num_blocks = gen_length // block_length
  spb = steps // num_blocks
  for b in range(num_blocks):
    start, end = P + b * block_length, P + (b + 1) * block_length
    n = jnp.sum(x[:, start:end] == mask_id, axis=1, keepdims=True)
    k_sched = n // spb + (jnp.arange(spb)[None, :] < n % spb)
    for i in range(spb):
      mask_index = x == mask_id
      logits = model(x)  # jitted forward, whole sequence, every step
      x0 = jnp.argmax(logits, axis=-1)
      p = jax.nn.softmax(logits, axis=-1)
      x0_p = jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
      x0_p = x0_p.at[:, end:].set(-jnp.inf)
      x0 = jnp.where(mask_index, x0, x)
      confidence = jnp.where(mask_index, x0_p, -jnp.inf)
      transfer = np.zeros((B, x.shape[1]), bool)
      for j in range(B):  # per-row top-k with a data-dependent k (a host sync per row)
        _, idx = jax.lax.top_k(confidence[j], int(k_sched[j, i]))
        transfer[j, np.asarray(idx)] = True
      x = jnp.where(transfer, x0, x)
  return x


def run(cfg: ModelConfig, batches, gen_lengths, block_length: int, prompt_len: int,
        repeats: int) -> dict:
  need = prompt_len + max(gen_lengths)
  if need > cfg.max_sequence_length:  # RoPE has no table: any length works
    cfg = cfg.replace(max_sequence_length=need)
  model = model_lib.init(cfg)
  machine = common.machine()
  results = []
  for batch in batches:
    for gen_length in gen_lengths:
      bl = min(block_length, gen_length)
      args = dict(steps=gen_length, gen_length=gen_length, block_length=bl)
      prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0,
                                  cfg.vocab_size).astype(jnp.int32)
      prompt = jnp.where(prompt == cfg.mask_token_id, 0, prompt)
      start = time.perf_counter()
      compiled_out = jax.block_until_ready(sampling.generate(model, prompt, **args))
      first_call = time.perf_counter() - start
      compiled_s = common.time_call(lambda: sampling.generate(model, prompt, **args), repeats, 0)
      loop_out = jax.block_until_ready(loop_generate(model, prompt, **args))  # warm-up
      loop_s = common.time_call(lambda: loop_generate(model, prompt, **args), repeats, 0)
      tokens = batch * gen_length
      results.append({
          "batch": batch, "gen_length": gen_length, "steps": gen_length, "block_length": bl,
          "prompt_len": prompt_len, "repeats": repeats,
          "loop_seconds": loop_s, "compiled_seconds": compiled_s,
          "loop_tokens_per_s": common.per_second(tokens, loop_s),
          "compiled_tokens_per_s": common.per_second(tokens, compiled_s),
          "speedup": loop_s["median"] / compiled_s["median"],
          "compiled_first_call_seconds": first_call,
          "same_tokens": bool((np.asarray(loop_out) == np.asarray(compiled_out)).all()),
      })
  return {"benchmark": "sampling", "machine": machine,
          "model": {"params": cfg.num_params(), "d_model": cfg.d_model,
                    "n_layers": cfg.n_layers, "dtype": cfg.dtype},
          "results": results}


def main(argv):
  del argv
  cfg = ModelConfig.from_dict(FLAGS.config.model)
  result = run(cfg, [int(b) for b in FLAGS.batches], [int(g) for g in FLAGS.gen_lengths],
               FLAGS.block_length, FLAGS.prompt_len, FLAGS.repeats)
  common.report(result, FLAGS.output, lambda r: (
      f"batch {r['batch']:2d} gen {r['gen_length']:4d}: loop "
      f"{r['loop_tokens_per_s']['median']:8.1f} tok/s, compiled "
      f"{r['compiled_tokens_per_s']['median']:8.1f} tok/s, x{r['speedup']:.1f}"
      f" (same tokens: {r['same_tokens']})"))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
