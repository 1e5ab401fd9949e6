"""Will it fit? Ahead-of-time compile of the real train step for a TPU slice, on a CPU.

  python -m llada_jax.aot --config configs/llada_8b_sft.py --topology v5p-64 \
      [--config.batch_size=N] [--max_batch]

Compiles `train.compile_train_step` (the same code path as training) for the
slice's devices (`jax.experimental.topologies`, needs libtpu: the `tpu`
extra) and prints per-chip memory (arguments, temporaries, peak vs HBM) and
the step's FLOPs vs model FLOPs. `cost_analysis()` counts the body of a while
loop once, and the step has several: the scanned layers, the micro-batches, the
loss's vocabulary chunks and, on TPU slices, the windowed ("collective matmul")
loops XLA makes of the FSDP all-gather / reduce-scatter matmuls (one iteration
per shard: a 1-layer 8B step on v5e-32 counted 0.26x the model FLOPs). So the
FLOPs come from unscanned 1- and 2-layer compiles, extrapolated linearly, with
one micro-batch, full logits and windowed einsums off (`FLOPS_COMPILE`): the
same arithmetic, every loop gone.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from llada_jax.config import ModelConfig
from llada_jax.layers import moe
from llada_jax.training import flops as flops_lib
from llada_jax.training import train

GIB = 1024 ** 3
# libtpu options for the FLOPs compiles: plain matmuls + collectives, no windowed loops.
FLOPS_COMPILE = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
# slice family -> (JAX topology prefix, TensorCores per chip in the slice name,
#                  torus dimensions, HBM per chip in bytes)
FAMILIES = {
    "v4": ("v4", 2, 3, 32 * GIB),
    "v5p": ("v5", 2, 3, 95 * GIB),
    "v5e": ("v5e", 1, 2, 16 * GIB),
    "v5litepod": ("v5e", 1, 2, 16 * GIB),
    "v6e": ("v6e", 1, 2, 32 * GIB),
}


# chips -> torus shape of the standard slices
GRIDS = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8"},
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
}


def topology(slice_name: str) -> tuple[str, int]:
  """('v5:2x4x4', HBM bytes per chip) for a slice name like 'v5p-64' (or a topology)."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", slice_name)
  if match is None:
    prefix = slice_name.split(":")[0]
    hbm = {fam[0]: fam[3] for fam in FAMILIES.values()}.get(prefix)
    if ":" not in slice_name or hbm is None:
      raise ValueError(f"--topology {slice_name!r}: want a slice such as v5p-64, v5e-16, "
                       "v6e-8, v4-32 or a JAX topology such as v5:2x4x4")
    return slice_name, hbm
  prefix, cores_per_chip, dims, hbm = FAMILIES[match.group(1)]
  chips = int(match.group(2)) // cores_per_chip
  if chips not in GRIDS[dims]:
    raise ValueError(f"--topology {slice_name!r}: {chips} chips is not a standard slice "
                     f"(chips: {sorted(GRIDS[dims])})")
  return f"{prefix}:{GRIDS[dims][chips]}", hbm


def tpu_devices(topology_name: str):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topology_name!r} (is libtpu installed? "
                       f"pip install 'llada_jax[tpu]'): {e}") from e
  return desc.devices


def for_target(model_cfg: ModelConfig, devices) -> ModelConfig:
  """`model_cfg` with settings that depend on the backend resolved for `devices`
  (MoE "auto" dispatch would otherwise follow this host's CPU backend)."""
  return model_cfg.replace(moe_impl=moe.resolve_impl(model_cfg.moe_impl, devices[0].platform))


def compile_step(cfg, model_cfg: ModelConfig, devices, compiler_options=None):
  """The compiled train step for abstract `devices` (nothing is allocated)."""
  mesh = train.make_mesh(cfg, devices)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if cfg.batch_size % batch_ways:
    raise ValueError(f"config.batch_size={cfg.batch_size} does not split over the "
                     f"{batch_ways} data x fsdp x expert devices of this slice; use a multiple "
                     "of it")
  step_fn, abstract, _, _ = train.compile_train_step(cfg, model_cfg, mesh)
  obj = train.objective(cfg)
  shardings = train.batch_shardings(mesh, obj)
  batch = {k: jax.ShapeDtypeStruct((cfg.batch_size,) if k in obj.vectors
                                   else (cfg.batch_size, cfg.seq_len), jnp.int32, sharding=sh)
           for k, sh in shardings.items()}
  reference = (abstract["params"],) if obj.reference else ()  # frozen, sharded like the policy
  return step_fn.lower(abstract, batch, *reference).compile(compiler_options)


def memory(compiled) -> dict[str, float]:
  """Per-chip memory of a compiled step in GiB."""
  m = compiled.memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = m.alias_size_in_bytes
  peak = getattr(m, "peak_memory_in_bytes", 0) or (args + out + temp - alias
                                                   + m.generated_code_size_in_bytes)
  return {"arguments_gib": args / GIB, "outputs_gib": out / GIB, "temporaries_gib": temp / GIB,
          "peak_gib": peak / GIB}


def step_flops(cfg, model_cfg: ModelConfig, devices) -> float:
  """Compiled FLOPs of the whole step (all chips), from loop-free unscanned 1- and
  2-layer compiles (module docstring)."""
  flat = cfg.copy_and_resolve_references()
  flat.micro_batches, flat.loss_vocab_chunk = 1, 0
  options = FLOPS_COMPILE if devices[0].platform == "tpu" else None
  per = []
  for layers in (1, 2):
    small = model_cfg.replace(n_layers=layers, scan_layers=False,
                              moe_layers=model_cfg.moe_layers[:layers])  # MoE: the first ones
    cost = compile_step(flat, small, devices, options).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per.append(float(cost.get("flops", 0.0)))
  return (per[0] + (model_cfg.n_layers - 1) * (per[1] - per[0])) * len(devices)


def fits(cfg, model_cfg, devices, hbm: float) -> tuple[bool, dict[str, float] | str]:
  try:
    mem = memory(compile_step(cfg, model_cfg, devices))
  except Exception as e:  # pylint: disable=broad-except  (XLA: RESOURCE_EXHAUSTED)
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      return False, str(e).splitlines()[0][:200]
    raise
  return mem["peak_gib"] * GIB <= hbm, mem


def report(cfg, slice_name: str, max_batch: bool = False) -> dict[str, Any]:
  """Memory and FLOPs of `cfg`'s train step on `slice_name` (JSON-able)."""
  topo, hbm = topology(slice_name)
  devices = tpu_devices(topo)
  model_cfg = for_target(ModelConfig.from_dict({**dict(cfg.model), "param_dtype": "float32"}),
                         devices)
  t0 = time.time()
  ok, mem = fits(cfg, model_cfg, devices, hbm)
  mesh = train.make_mesh(cfg, devices)
  out: dict[str, Any] = {"slice": slice_name, "topology": topo, "chips": len(devices),
                         "mesh": dict(mesh.shape), "remat_policy": model_cfg.remat_policy,
                         "hbm_gib": hbm / GIB, "batch_size": cfg.batch_size,
                         "seq_len": cfg.seq_len, "fits": ok, "compile_s": time.time() - t0,
                         **({"moe_impl": model_cfg.moe_impl} if model_cfg.num_experts else {})}
  out.update(mem if isinstance(mem, dict) else {"error": mem})
  model_flops = flops_lib.flops_per_token(model_cfg, cfg.seq_len) * cfg.batch_size * cfg.seq_len
  compiled_flops = step_flops(cfg, model_cfg, devices)
  out.update(model_tflops=model_flops / 1e12, compiled_tflops=compiled_flops / 1e12,
             compiled_over_model=compiled_flops / model_flops)
  if max_batch:
    out["max_batch_per_chip"] = largest_batch(cfg, model_cfg, devices, hbm)
  return out


def largest_batch(cfg, model_cfg, devices, hbm: float) -> int:
  """Largest per-chip batch (rows) that fits, by doubling then bisection."""
  n = len(devices)
  def ok(per_chip):
    trial = cfg.copy_and_resolve_references()
    trial.batch_size, trial.micro_batches = per_chip * n, 1
    return fits(trial, model_cfg, devices, hbm)[0]
  lo, hi = 0, 1
  while ok(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return lo


def main(argv) -> None:
  del argv
  # Off a TPU VM libtpu cannot look the workers up (v6e descriptions then fail).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  f = flags.FLAGS
  print(json.dumps(report(f.config, f.topology, f.max_batch), indent=2))


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
  flags.DEFINE_string("topology", None, "slice (v5p-64, v5e-16, v6e-8, v4-32) or topology")
  flags.DEFINE_bool("max_batch", False, "also search the largest per-chip batch that fits")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
