"""LLaDA-MoE-7B-A1B supervised fine-tuning: the dense SFT recipe on the MoE model.

`--config.init_from=DIR` (the Base snapshot, converted dir or workdir) on chat
JSONL data; prompt never masked; router load-balancing loss weighted 0.01 as in
the released config.json. Experts shard over the mesh's `expert` axis
(`--config.mesh.expert=N`), the rest as the dense SFT config.
"""

from configs import llada_8b_sft
from configs import llada_moe_7b


def get_config():
  cfg = llada_8b_sft.get_config()
  cfg.model = llada_moe_7b.model_config()
  cfg.batch_size = 256
  return cfg
