"""Orbax checkpoint (converted directory or training workdir) -> HuggingFace LLaDA snapshot.

    python -m llada_jax.convert.orbax_to_hf --checkpoint DIR --output_dir DIR [--dtype bfloat16|float32]
        [--max_shard_size 5GB] [--overwrite] [--allow_nonfinite]

Writes safetensors shards + `model.safetensors.index.json` with the released
checkpoint's tensor names and shapes, `config.json` in the LLaDA format and
the tokenizer files, so the official PyTorch modeling code loads the result.
Parameters are restored one at a time and streamed into the shards, each
checked against its digest and for NaN / Inf (refused unless --allow_nonfinite).
"""

from __future__ import annotations

import argparse
import sys

from llada_jax import paths
from llada_jax.checkpoints import hf as hf_checkpoint
from llada_jax.checkpoints import layout
from llada_jax.checkpoints import orbax as checkpoint
from llada_jax.convert import hf_to_orbax
from llada_jax.convert import staging


def convert(checkpoint_dir: str, output_dir: str, dtype: str | None = None,
            max_shard_size: str | int = "5GB", overwrite: bool = False,
            progress: bool = True, allow_nonfinite: bool = False) -> dict:
  """Converts; returns the summary (params, tensors, bytes, seconds, peak_rss_bytes)."""
  if not paths.isdir(checkpoint_dir):
    raise FileNotFoundError(f"{checkpoint_dir}: no such directory")
  staging.check_output(output_dir, overwrite, [checkpoint_dir])
  if layout.model_dir_kind(checkpoint_dir) == "hf":
    raise ValueError(f"{checkpoint_dir}: holds no Orbax checkpoint ({layout.PARAMS_DIR}/ "
                     f"or {layout.CHECKPOINTS_DIR}/)")
  hf_checkpoint.parse_size(max_shard_size)  # refuse a bad size before any work
  cfg = layout.read_config(checkpoint_dir)
  params = checkpoint.OrbaxParams(checkpoint_dir, allow_nonfinite=allow_nonfinite,
                                  nonfinite_hint=hf_to_orbax.NONFINITE_HINT)
  params.check(cfg)
  dtype = dtype or params.source_dtype()
  if dtype not in hf_checkpoint.NP_DTYPES:
    raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(hf_checkpoint.NP_DTYPES)}")
  shapes = hf_checkpoint.expected_hf_shapes(cfg)
  with staging.staged_output(output_dir, overwrite, [checkpoint_dir]) as tmp:
    writer = hf_checkpoint.SafetensorsShardWriter(tmp, shapes, dtype, max_shard_size)
    layout.write_config(tmp, cfg, dtype, checkpoint_dir)
    layout.copy_tokenizer_files(checkpoint_dir, tmp)
    bar = staging.Progress(writer.total_size, len(shapes), "orbax -> hf", progress)
    return staging.write_tensors(writer, bar, hf_checkpoint.hf_tensors(params, cfg),
                                 lambda w: w.size * writer.np_dtype.itemsize, lambda name: 1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="llada-orbax-to-hf", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True,
                      help="converted checkpoint directory or training workdir")
  parser.add_argument("--output_dir", required=True, help="HF snapshot directory to write")
  parser.add_argument("--max_shard_size", default="5GB",
                      help="largest safetensors shard, e.g. 5GB or 500MiB")
  staging.add_common_flags(parser, hf_checkpoint.NP_DTYPES, "checkpoint", "snapshot")
  args = parser.parse_args(argv)
  return staging.run_cli(parser.prog, args.output_dir, lambda: staging.summary_line(
      f"wrote {args.output_dir}", convert(args.checkpoint, args.output_dir, args.dtype,
                                          args.max_shard_size, args.overwrite,
                                          not args.no_progress, args.allow_nonfinite)))


if __name__ == "__main__":
  sys.exit(main())
