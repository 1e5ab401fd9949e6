"""LLaDA-MoE-7B-A1B (Base and Instruct, inclusionAI; arXiv 2509.24389): the released sizes.

7.4B parameters, 1.4B active per token: 16 layers, all MoE (64 SwiGLU experts
of hidden 1024, top-8, router bias), hidden 2048, 16 heads, per-head q/k
RMSNorm, RoPE theta 50,000 over the whole head, the Ling tokenizer (vocabulary
157,184; mask 156895, EOS 156892). `llada_jax.load(DIR)` reads these from the
snapshot's config.json; this file is for training from scratch and AOT checks.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      family="llada_moe",
      d_model=2048,
      n_heads=16,
      n_kv_heads=16,
      n_layers=16,
      mlp_hidden_size=8192,  # dense_intermediate_size (no dense layer uses it)
      vocab_size=157184,
      embedding_size=157184,
      max_sequence_length=8192,
      rope_theta=50000.0,
      rms_norm_eps=1e-5,
      weight_tying=False,
      qk_norm=True,
      partial_rotary_factor=1.0,
      num_experts=64,
      num_experts_per_tok=8,
      moe_hidden_size=1024,
      shared_expert_hidden_size=0,
      moe_layers=[1] * 16,
      expert_bias=True,
      router_aux_loss_coef=0.01,
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
