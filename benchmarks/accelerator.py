"""Sampler and training speed of an LLaDA-8B-shaped layer stack on an accelerator.

  python -m benchmarks.accelerator [--layers 4] [--batches 1,8] [--gen_lengths 256,1024]
      [--caches none,dual] [--block_length 32] [--prompt_len 64] [--repeats 2]
      [--train_batch 8] [--train_seq 1024] [--remat_policy full] [--skip_train]
      [--official_dir DIR] [--small] [--output FILE]

The model is LLaDA-8B's (`configs/llada_8b.py`: d_model 4096, 32 heads, MLP
12,288, vocabulary 126,464) cut to `--layers` layers, with random weights:

  sample    `llada_jax.generate` in bf16 (weights and compute; `--dtype`), greedy,
            low-confidence remasking, steps = gen_length (one token per step),
            per batch × gen_length × cache; tokens/s over `--repeats` timed calls
            after a warm-up (min/median/max). For cache "none" also the MFU of a
            full forward of the canvas per step (the official sampler's work;
            ours skips the head and the last layer outside the block).
  train     the real jitted step (`benchmarks.train.bench_step`: float32 master
            weights, bf16 compute, the 8B config's remat) on random tokens:
            seconds a step, tokens/s and MFU (3 × forward FLOPs).
  official  with `--official_dir` (the official `refllada/` files laid out as
            ../shared/bench/README.md says, and torch; on CUDA when torch sees
            it): the official `generate` on the same weights (bf16) and prompts,
            its tokens/s, our ratio to it and the share of generated tokens that
            equal ours (100% for cache "none" in float32; the caches and bf16
            round differently).

MFU is against this device's measured bf16 matmul peak (`flops.matmul_peak_flops`
on 8192² operands; float32 and smaller on CPU). Rows are written to `--output` as
they finish, so a run stopped by a time limit keeps what it measured.
`--small` (d_model 256, 4 heads, vocabulary 2,048) is for a run on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import train as train_bench
from configs import llada_8b, tiny
from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.sampling import sampler
from llada_jax.training import flops as flops_lib

CACHES = ("none", "prefix", "dual")
# A CPU-sized stand-in for the 8B shape (--small).
SMALL = dict(d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=2048,
             embedding_size=2048, mask_token_id=2000, eos_token_id=1990, pad_token_id=1990,
             bos_token_id=1989, eot_token_id=1991)
# The HF config keys the official LLaDAConfig does not take as arguments.
HF_SKIP = ("auto_map", "architectures", "model_type", "transformers_version", "_name_or_path")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
  ap.add_argument("--layers", type=int, default=4, help="layers of the 8B stack kept")
  ap.add_argument("--batches", type=ints, default=[1, 8])
  ap.add_argument("--gen_lengths", type=ints, default=[256, 1024])
  ap.add_argument("--caches", default="none,dual", help=f"comma list of {', '.join(CACHES)}")
  ap.add_argument("--block_length", type=int, default=32)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up")
  ap.add_argument("--train_batch", type=int, default=8)
  ap.add_argument("--train_seq", type=int, default=1024)
  ap.add_argument("--train_steps", type=int, default=3, help="steps per timed repeat")
  ap.add_argument("--remat_policy", default="", choices=("", *model_lib.REMAT_POLICIES),
                  help="empty: the 8B config's (full)")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                  help="the sampler's weights and compute (and the official model's)")
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--skip_sample", action="store_true")
  ap.add_argument("--official_dir", default="",
                  help="folder holding refllada/ (the official modeling and generate code)")
  ap.add_argument("--small", action="store_true", help="a small shape for a CPU run")
  ap.add_argument("--output", default="")
  args = ap.parse_args(argv)
  args.caches = [c for c in args.caches.split(",") if c]
  bad = [c for c in args.caches if c not in CACHES]
  if bad:
    ap.error(f"--caches: unknown {', '.join(bad)} (choose from {', '.join(CACHES)})")
  if args.layers < 1 or min(args.batches + args.gen_lengths) < 1:
    ap.error("--layers, --batches and --gen_lengths must be positive")
  bad = [g for g in args.gen_lengths if g % min(args.block_length, g)]
  if bad:
    ap.error(f"--gen_lengths {bad}: not multiples of --block_length {args.block_length}")
  if args.official_dir and not os.path.isfile(
      os.path.join(args.official_dir, "refllada", "modeling_llada.py")):
    ap.error(f"--official_dir {args.official_dir}: no refllada/modeling_llada.py in it")
  if not args.skip_train and args.train_batch % jax.device_count():
    ap.error(f"--train_batch {args.train_batch}: not a multiple of the {jax.device_count()} "
             "devices the batch is split over")
  if args.output and os.path.isdir(args.output):
    ap.error(f"--output {args.output} is a directory; give a file name")
  return args


def model_dict(args, **overrides) -> dict:
  """The 8B model config dict cut to `args.layers` layers (`--small`: the small shape)."""
  cfg = llada_8b.model_config().to_dict()
  cfg.update(n_layers=args.layers, max_sequence_length=max(
      cfg["max_sequence_length"], args.prompt_len + max(args.gen_lengths), args.train_seq))
  if args.small:
    cfg.update(SMALL)
  cfg.update(overrides)
  return cfg


def peak_flops(dtype) -> tuple[float, str]:
  """The measured matmul peak in the compute dtype (bf16; float32 on CPU)."""
  if jax.default_backend() == "cpu":
    return flops_lib.matmul_peak_flops(), "float32 1024² / 2048² matmul"
  return (flops_lib.matmul_peak_flops(sizes=(4096, 8192), dtype=dtype, repeats=10),
          f"{jnp.dtype(dtype).name} 4096² / 8192² matmul")


def prompts(cfg: ModelConfig, batch: int, length: int, count: int) -> list[np.ndarray]:
  """`count` random prompts [batch, length] of ordinary tokens (ids below the special ones)."""
  rng = np.random.default_rng([batch, length])
  top = min(cfg.mask_token_id, cfg.eos_token_id, cfg.bos_token_id) - 1
  return [rng.integers(0, top, size=(batch, length)).astype(np.int32) for _ in range(count)]


def timed(fn, inputs) -> tuple[dict, float, list]:
  """(seconds of fn over inputs[1:] as min/median/max, seconds of the first call, outputs)."""
  t0 = time.perf_counter()
  outs = [np.asarray(jax.block_until_ready(fn(inputs[0])))]
  first = time.perf_counter() - t0
  seconds = []
  for x in inputs[1:]:
    t0 = time.perf_counter()
    outs.append(np.asarray(jax.block_until_ready(fn(x))))
    seconds.append(time.perf_counter() - t0)
  return common.stats(seconds), first, outs


class OfficialModel:
  """The official model, called as its generate.py calls it (model(x).logits), through
  the inner `model.model` (transformers 5's wrapper fails on `config.use_cache`)."""

  def __init__(self, official_dir: str, jax_model, cfg: ModelConfig):
    import torch  # pylint: disable=g-import-not-at-top
    from llada_jax.checkpoints.hf import hf_tensors  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, official_dir)
    from refllada.configuration_llada import LLaDAConfig  # pylint: disable=g-import-not-at-top
    from refllada.modeling_llada import LLaDAModelLM  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from llada_jax.checkpoints.orbax import flat_params  # pylint: disable=g-import-not-at-top
    hf = {k: v for k, v in cfg.to_hf(cfg.dtype).items() if k not in HF_SKIP}
    model = LLaDAModelLM(LLaDAConfig(**hf), init_params=False)
    params = {path: np.asarray(jnp.asarray(v, jnp.float32))
              for path, v in flat_params(nnx.state(jax_model, nnx.Param)).items()}
    state = {name: torch.from_numpy(np.array(w)) for name, w in hf_tensors(params, cfg)}
    model.load_state_dict(state, strict=True)
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.m = model.to(self.device, getattr(torch, cfg.dtype)).eval()

  def __call__(self, input_ids, attention_mask=None):
    return self.m.model(input_ids=input_ids, attention_mask=attention_mask)


def official_generate(official_dir: str, model: OfficialModel, cfg: ModelConfig, **kw):
  """prompt [B, P] numpy -> tokens numpy, by the official `generate` (greedy)."""
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, official_dir)
  from refllada import generate as official  # pylint: disable=g-import-not-at-top

  def run(prompt_BP):
    with torch.inference_mode():
      x = official.generate(model, torch.tensor(prompt_BP, dtype=torch.long, device=model.device),
                            None, temperature=0., cfg_scale=0., remasking="low_confidence",
                            mask_id=cfg.mask_token_id, **kw)
      if model.device.type == "cuda":
        torch.cuda.synchronize()
    return x.cpu().numpy()
  return run


def _generated(outs: list[np.ndarray], prompt_len: int) -> np.ndarray:
  """The generated tokens of every call's canvas, stacked."""
  return np.concatenate([o[:, prompt_len:] for o in outs])


def bench_sample(args, cfg: ModelConfig, peak: float, emit) -> None:
  """One row per batch × gen_length × cache (+ the official generate's with --official_dir)."""
  model = model_lib.init(cfg)
  official = OfficialModel(args.official_dir, model, cfg) if args.official_dir else None
  for batch in args.batches:
    for gen in args.gen_lengths:
      block = min(args.block_length, gen)
      kw = dict(steps=gen, gen_length=gen, block_length=block)
      inputs = prompts(cfg, batch, args.prompt_len, 1 + args.repeats)
      length = args.prompt_len + gen
      full_forwards = gen * batch * length * cfg.forward_flops_per_token(length)  # one a step

      def row(part, seconds, first, **extra):
        return {"part": part, "batch": batch, "gen_length": gen, "block_length": block,
                "prompt_len": args.prompt_len, **extra, "seconds": seconds,
                "first_call_seconds": first,
                "tokens_per_s": common.per_second(batch * gen, seconds)}

      ours = {}  # cache -> (generated tokens, median seconds)
      for cache in args.caches:
        seconds, first, outs = timed(lambda p, c=cache: sampler.generate(
            model, p, temperature=0., cache=c, **kw), inputs)
        ours[cache] = _generated(outs, args.prompt_len), seconds["median"]
        mfu = full_forwards / seconds["median"] / peak
        emit(row("sample", seconds, first, cache=cache,
                 **({"mfu_full_forward": mfu} if cache == "none" else {})))
      if official is not None:
        seconds, first, outs = timed(official_generate(args.official_dir, official, cfg, **kw),
                                     inputs)
        theirs = _generated(outs, args.prompt_len)
        extra = {"mfu_full_forward": full_forwards / seconds["median"] / peak}
        for cache, (tokens, median) in ours.items():
          extra[f"ours_{cache}_over_official"] = seconds["median"] / median
          extra[f"token_agreement_ours_{cache}"] = float((tokens == theirs).mean())
        emit(row("official", seconds, first, **extra))


def bench_train(args, model: dict, peak: float, emit) -> None:
  """The jitted training step on random tokens: seconds a step, tokens/s, MFU."""
  cfg = tiny.get_config()
  cfg.model = model
  if args.remat_policy:
    cfg.model.remat_policy = args.remat_policy
  cfg.update(batch_size=args.train_batch, seq_len=args.train_seq, total_steps=1000,
             loss_vocab_chunk=8192)
  model_cfg = ModelConfig.from_dict(cfg.model)
  step = train_bench.bench_step(cfg, args.train_steps, args.repeats, peak)
  emit({"part": "train", "batch": cfg.batch_size, "seq_len": cfg.seq_len,
        "remat_policy": model_cfg.remat_policy, "params": model_cfg.num_params(),
        "step_seconds": step["step_s"], "first_step_seconds": step["first_step_s"],
        "tokens_per_s": common.per_second(cfg.batch_size * cfg.seq_len, step["step_s"]),
        "mfu": step["mfu"]})


def row_line(row: dict) -> str:
  rate = row["tokens_per_s"]["median"]
  if row["part"] == "train":
    return (f"train b{row['batch']} L{row['seq_len']}: {row['step_seconds']['median']:.3f} s/step,"
            f" {rate:,.0f} tok/s, MFU {100 * row['mfu']:.1f}%")
  head = f"{row['part']:8s} b{row['batch']} gen {row['gen_length']}"
  if row["part"] == "sample":
    mfu = f", MFU {100 * row['mfu_full_forward']:.1f}%" if "mfu_full_forward" in row else ""
    return f"{head} cache {row['cache']}: {rate:,.1f} tok/s{mfu}"
  ratios = ", ".join(f"{k} {v:.2f}x" for k, v in row.items() if k.endswith("_over_official"))
  agree = ", ".join(f"{k[len('token_agreement_'):]} {100 * v:.1f}%" for k, v in row.items()
                    if k.startswith("token_agreement_"))
  return f"{head}: {rate:,.1f} tok/s; {ratios}; tokens equal to: {agree}"


def main(argv=None) -> None:
  args = parse_args(argv)
  machine = common.machine()
  machine["device_kind"] = jax.devices()[0].device_kind
  sample_cfg = ModelConfig.from_dict(model_dict(args, dtype=args.dtype, param_dtype=args.dtype))
  peak, peak_how = peak_flops(jnp.dtype(args.dtype))
  result = {"benchmark": "accelerator", "machine": machine, "peak_flops_per_s": peak,
            "peak_measured_by": peak_how,
            "model": {"layers": args.layers, "d_model": sample_cfg.d_model,
                      "n_heads": sample_cfg.n_heads, "mlp_hidden_size": sample_cfg.mlp_hidden_size,
                      "vocab_size": sample_cfg.vocab_size, "params": sample_cfg.num_params()},
            "repeats": args.repeats, "results": []}
  print(f"{machine['device_kind']}: peak {peak / 1e12:.1f} TFLOP/s ({peak_how}); "
        f"{args.layers} layers, {sample_cfg.num_params() / 1e6:,.1f}M params", flush=True)

  def emit(row):
    result["results"].append(row)
    if args.output:
      os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
      with open(args.output, "w") as f:
        json.dump({**result, "load_average_end": common.load_average()}, f, indent=2)
    print(row_line(row), flush=True)

  if not args.skip_sample:
    bench_sample(args, sample_cfg, peak, emit)
  if not args.skip_train:
    bench_train(args, model_dict(args), peak, emit)
  if args.output:
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
