"""LLaDA2-mini supervised fine-tuning: the dense SFT recipe on the block-diffusion MoE.

`--config.init_from=DIR` (a LLaDA2.0/2.1-mini snapshot, converted dir or
workdir) on chat JSONL data; prompt never masked. The trainer's objective is
LLaDA's (bidirectional attention); block-diffusion SFT with the block-causal
mask (`forward_with_aux(..., block_length=32)`) is the post-training issue's.
Experts shard over the mesh's `expert` axis (`--config.mesh.expert=N`).
"""

from configs import llada2_mini
from configs import llada_8b_sft


def get_config():
  cfg = llada_8b_sft.get_config()
  cfg.model = llada2_mini.model_config()
  cfg.batch_size = 256
  return cfg
