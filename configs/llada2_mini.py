"""LLaDA2.0-mini / LLaDA2.1-mini (inclusionAI): the released sizes, block diffusion.

16B parameters, 1.4B active per token: 20 layers (layer 0 dense, FFN 5120;
layers 1-19 MoE: 256 SwiGLU experts of hidden 512 in 8 groups, top-8 within the
best 4 groups, sigmoid router with selection-only bias, weights x 2.5, one
shared expert), hidden 2048, 16 query / 4 kv heads of 128, per-head q/k
RMSNorm, RoPE theta 600,000 over half of each head, the Ling tokenizer
(vocabulary 157,184; mask 156895, EOS = pad 156892). Sizes as LLaDA2.1-mini's
config.json (LLaDA2.0-mini has the same architecture; its max_position_embeddings
may differ). `llada_jax.load(DIR)` reads all this from a snapshot; this file is
for training from scratch and the AOT checks. Generation is block-diffusion:
`sampling/block.py`, block 32, threshold 0.95 (`block.DEFAULTS`).
"""

from configs import llada_moe_7b

BLOCK_LENGTH = 32  # the released generate's default and the trained block size


def model_config():
  cfg = llada_moe_7b.model_config()  # the Ling-tokenizer MoE sizes this family shares
  cfg.update(family="llada2", n_kv_heads=4, explicit_head_dim=128, n_layers=20,
             mlp_hidden_size=5120,  # intermediate_size: the first_k_dense_replace = 1 dense layer
             max_sequence_length=32768, rope_theta=600000.0, rms_norm_eps=1e-6,
             partial_rotary_factor=0.5, num_experts=256, moe_hidden_size=512,
             shared_expert_hidden_size=512,  # num_shared_experts = 1
             moe_layers=[0] + [1] * 19, router="sigmoid_grouped", n_group=8, topk_group=4,
             routed_scaling_factor=2.5, router_aux_loss_coef=0.0)
  return cfg


def get_config():
  cfg = llada_moe_7b.get_config()
  cfg.model = model_config()
  return cfg
