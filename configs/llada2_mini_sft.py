"""LLaDA2-mini supervised fine-tuning: the dense SFT recipe on the block-diffusion MoE.

`--config.init_from=DIR` (a LLaDA2.0/2.1-mini snapshot, converted dir or
workdir) on chat JSONL data; prompt never masked. The objective is LLaDA's
(bidirectional attention); block-diffusion SFT, the LLaDA2 recipe, is
`configs/llada2_mini_block_sft.py` (or `--config.kind=block_sft
--config.block_length=32` here).
Experts shard over the mesh's `expert` axis (`--config.mesh.expert=N`).
"""

from configs import llada2_mini
from configs import llada_8b_sft


def get_config():
  cfg = llada_8b_sft.get_config()
  cfg.model = llada2_mini.model_config()
  cfg.batch_size = 256
  return cfg
