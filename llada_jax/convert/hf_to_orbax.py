"""HuggingFace LLaDA snapshot -> converted Orbax checkpoint directory.

    python -m llada_jax.convert.hf_to_orbax --hf_dir DIR --output_dir DIR [--dtype bfloat16|float32] [--overwrite]
        [--allow_nonfinite]

Reads sharded or single safetensors (or PyTorch `.bin` with torch installed),
checks every tensor against config.json before reading data, and writes
`config.json`, the tokenizer files and `params/` (Orbax) one stacked
parameter at a time: peak memory is about twice the largest stacked tensor,
whatever the model size. A tensor holding NaN / Inf is refused (naming it)
unless --allow_nonfinite; the output carries a digest per parameter.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from llada_jax import paths
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import hub
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import orbax as checkpoint
from llada_jax.convert import staging
from llada_jax.models import param_shapes


NONFINITE_HINT = "pass --allow_nonfinite to convert it anyway"


def convert(hf_dir: str, output_dir: str, dtype: str | None = None,
            overwrite: bool = False, progress: bool = True,
            allow_nonfinite: bool = False) -> dict:
  """Converts; returns the summary (params, tensors, bytes, seconds, peak_rss_bytes)."""
  hf_dir = hub.resolve_model_dir(hf_dir)  # a directory, or a Hub id owner/name[@revision]
  if not paths.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir}: no such directory")
  staging.check_output(output_dir, overwrite, [hf_dir])
  cfg = layout.read_config(hf_dir)
  reader = hf_checkpoint.open_reader(hf_dir)
  reader.check(cfg)
  dtype = dtype or reader.source_dtype()
  if dtype not in hf_checkpoint.NP_DTYPES:
    raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(hf_checkpoint.NP_DTYPES)}")
  cfg = cfg.replace(param_dtype=dtype)
  shapes = param_shapes(cfg)
  itemsize = np.dtype(hf_checkpoint.NP_DTYPES[dtype]).itemsize
  with staging.staged_output(output_dir, overwrite, [hf_dir]) as tmp:
    layout.write_config(tmp, cfg, dtype, hf_dir)
    layout.copy_tokenizer_files(hf_dir, tmp)
    bar = staging.Progress(sum(math.prod(s) for s in shapes.values()) * itemsize,
                           len(reader.shapes), "hf -> orbax", progress)
    writer = checkpoint.ParamWriter(os.path.join(tmp, layout.PARAMS_DIR))
    hint = None if allow_nonfinite else NONFINITE_HINT
    return staging.write_tensors(
        writer, bar, hf_checkpoint.read_params(reader, cfg, dtype, hint), lambda a: a.nbytes,
        lambda path: cfg.n_layers if path.startswith("blocks/") else 1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="llada-hf-to-orbax", description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True, help="HF LLaDA snapshot directory")
  parser.add_argument("--output_dir", required=True, help="converted checkpoint directory")
  staging.add_common_flags(parser, hf_checkpoint.NP_DTYPES, "source", "checkpoint")
  args = parser.parse_args(argv)
  return staging.run_cli(parser.prog, args.output_dir, lambda: staging.summary_line(
      f"wrote {args.output_dir}", convert(args.hf_dir, args.output_dir, args.dtype,
                                          args.overwrite, not args.no_progress,
                                          args.allow_nonfinite)))


if __name__ == "__main__":
  sys.exit(main())
