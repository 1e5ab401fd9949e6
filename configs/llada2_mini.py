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

import ml_collections

BLOCK_LENGTH = 32  # the released generate's default and the trained block size


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      family="llada2",
      d_model=2048,
      n_heads=16,
      n_kv_heads=4,
      explicit_head_dim=128,
      n_layers=20,
      mlp_hidden_size=5120,  # intermediate_size: the first_k_dense_replace = 1 dense layer
      vocab_size=157184,
      embedding_size=157184,
      max_sequence_length=32768,
      rope_theta=600000.0,
      rms_norm_eps=1e-6,
      weight_tying=False,
      qk_norm=True,
      partial_rotary_factor=0.5,
      num_experts=256,
      num_experts_per_tok=8,
      moe_hidden_size=512,
      shared_expert_hidden_size=512,  # num_shared_experts = 1
      moe_layers=[0] + [1] * 19,
      expert_bias=True,
      router="sigmoid_grouped",
      n_group=8,
      topk_group=4,
      routed_scaling_factor=2.5,
      router_aux_loss_coef=0.0,
      router_z_loss_coef=0.0,
      mask_token_id=156895,
      eos_token_id=156892,
      pad_token_id=156892,
      bos_token_id=None,
      eot_token_id=None,
      dtype="bfloat16",  # TPU default: bf16 compute,
      param_dtype="float32",  # float32 master weights
      attention="xla",
      remat_policy="full",
      scan_layers=True,
  ))


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model_config()))
