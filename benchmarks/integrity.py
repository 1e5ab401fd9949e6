"""What the corruption checks cost: digest and finiteness passes over one array.

    python -m benchmarks.integrity [--mbytes 256] [--dtype float32|bfloat16] [--repeats 5]
        [--output benchmarks/results/integrity.json]

Times, per pass over an array of `--mbytes` MB: the host digest (what
ParamWriter adds to each converted parameter), the host finiteness check
(what conversion and HF loading add per tensor) and the device report
(digest + finiteness in one jitted pass, what a restore adds). Reports
GB/s as min / median / max over `--repeats` after one warm-up, with the load
average before and after (the CPU may be shared).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from benchmarks import common
from llada_jax.checkpoints import integrity


def run(mbytes: int = 256, dtype: str = "float32", repeats: int = 5) -> dict:
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  n = mbytes * 2**20 // np.dtype(np_dtype).itemsize
  host = np.random.default_rng(0).standard_normal(n, dtype=np.float32).astype(np_dtype)
  device = jnp.asarray(host)
  machine = common.machine()
  passes = {
      "host_digest": lambda: integrity.digest(host),
      "host_finite": lambda: integrity.nonfinite_count(host),
      "device_digest_and_finite": lambda: integrity.report({"x": device}),
  }
  results = {}
  for name, fn in passes.items():
    seconds = common.time_call(fn, repeats)
    results[name] = {"seconds": seconds, "gb_per_s": common.per_second(host.nbytes / 1e9,
                                                                      seconds)}
  return {"mbytes": mbytes, "dtype": dtype, "repeats": repeats, "results": results,
          "machine": machine}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mbytes", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--output")
  args = parser.parse_args()
  common.write_json(run(args.mbytes, args.dtype, args.repeats), args.output)


if __name__ == "__main__":
  main()
