"""Will LLaDA2 inference fit? AOT compile of the block-diffusion generate for a TPU slice.

  python -m benchmarks.aot_llada2 --topology v5e-8 [--config configs/llada2_mini.py]
      [--batch 8] [--prompt_len 1024] [--gen_length 1024] [--block_length 32]
      [--mesh 1,1,8,1] [--output out/aot_llada2_v5e-8.json]

Compiles `sampling/block.py`'s whole generate program (prefill, every block's
iterations on the KV cache) for the slice's devices on this CPU (needs libtpu,
the `tpu` extra) with bfloat16 parameters sharded by the logical rules over a
(data, fsdp, expert, tensor) mesh, and prints per-chip memory as JSON. The
training step's check is `python -m llada_jax.aot` (configs/llada2_mini_sft.py).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import config_flags

from benchmarks import common
from llada_jax import models, sharding
from llada_jax.config import ModelConfig
from llada_jax.sampling import block
from llada_jax.training import aot

FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file("config", "configs/llada2_mini.py", "Model config file.")
  flags.DEFINE_string("topology", None, "Slice (v5e-8, v6e-8, v5p-16...) or topology.")
  flags.DEFINE_integer("batch", 8, "Rows generated at once.")
  flags.DEFINE_integer("prompt_len", 1024, "Prompt width.")
  flags.DEFINE_integer("gen_length", 1024, "Tokens to generate.")
  flags.DEFINE_integer("block_length", 32, "Block length.")
  flags.DEFINE_list("mesh", None, "data,fsdp,expert,tensor (default: experts over all chips).")
  flags.DEFINE_string("output", None, "Also write the JSON here.")
  flags.mark_flag_as_required("topology")


def compile_generate(model_cfg: ModelConfig, devices, mesh_shape, batch: int, prompt_len: int,
                     gen_length: int, block_length: int):
  """The compiled block-diffusion generate for abstract `devices` (nothing allocated)."""
  mesh = sharding.make_mesh(mesh_shape, sharding.EXPERT_MESH_AXES, devices)
  graphdef, state = nnx.split(models.abstract(model_cfg, mesh=mesh))
  state = jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
                       nnx.to_pure_dict(state),
                       nnx.to_pure_dict(sharding.param_shardings(state, mesh)))
  s, knobs = block.check_settings(
      model_cfg, np.zeros((batch, prompt_len), np.int32), steps=block_length,
      gen_length=gen_length, block_length=block_length, temperature=0.0, threshold=None,
      editing_threshold=None, max_post_steps=None, num_to_transfer=None, stop_at_eos=True,
      return_nfe=True, kv_cache=True)
  rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh=mesh,
                                                      shape=(batch, s.canvas)))
  lengths = NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh=mesh, shape=(batch,)))
  canvas = jax.ShapeDtypeStruct((batch, s.canvas), jnp.int32, sharding=rows)
  fixed = jax.ShapeDtypeStruct((batch, s.canvas), jnp.bool_, sharding=rows)
  len_b = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=lengths)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  lowered = block._run_jit.lower(graphdef, state, canvas, fixed, len_b, rng, knobs, s=s)  # pylint: disable=protected-access
  return lowered.compile(), mesh


def main(argv):
  del argv
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  topo, hbm = aot.topology(FLAGS.topology)
  devices = aot.tpu_devices(topo)
  model_cfg = aot.for_target(ModelConfig.from_dict(
      {**dict(FLAGS.config.model), "dtype": "bfloat16", "param_dtype": "bfloat16"}), devices)
  mesh_shape = ([int(x) for x in FLAGS.mesh] if FLAGS.mesh else [1, 1, len(devices), 1])
  start = time.time()
  compiled, mesh = compile_generate(model_cfg, devices, mesh_shape, FLAGS.batch,
                                    FLAGS.prompt_len, FLAGS.gen_length, FLAGS.block_length)
  mem = aot.memory(compiled)
  result = {"check": "llada2 block generate", "slice": FLAGS.topology, "topology": topo,
            "chips": len(devices), "hbm_gib": hbm / aot.GIB, "mesh": dict(mesh.shape),
            "batch": FLAGS.batch, "prompt_len": FLAGS.prompt_len,
            "gen_length": FLAGS.gen_length, "block_length": FLAGS.block_length,
            "params": model_cfg.num_params(), "param_dtype": model_cfg.param_dtype,
            "fits": mem["peak_gib"] * aot.GIB <= hbm, "compile_s": time.time() - start,
            "loadavg": os.getloadavg(), **mem}
  common.write_json(result, FLAGS.output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
