"""LLaDA2-mini block-diffusion SFT: the LLaDA2 recipe (training/block_objectives.py).

`--config.init_from=DIR` (a LLaDA2.0/2.1-mini snapshot, converted dir or
workdir) on chat JSONL data. Each block of 32 (the released block size)
draws its own noise level; the model reads [x_t ; x_0] under the
block-diffusion mask (noisy block b sees itself and the clean blocks before
it), the prompt is never masked, and every row comes with its complement
mask. Optional, off here: a mask-ratio bandwidth (`t_min`, `t_max`),
Gaussian noise on the masked tokens' embeddings early on (`embed_noise_std`,
`embed_noise_steps`), and the CAP term (`cap_weight`; needs
`loss_vocab_chunk=0`, i.e. the full [B, L, V] logits).
"""

from configs import llada2_mini
from configs import llada2_mini_sft


def get_config():
  cfg = llada2_mini_sft.get_config()
  cfg.kind = "block_sft"
  cfg.block_length = llada2_mini.BLOCK_LENGTH
  cfg.complementary_masking = True  # the batch doubles: 2 x batch_size rows per step
  cfg.batch_size = 128
  return cfg
