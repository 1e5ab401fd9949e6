"""LLaDA-MoE-7B-A1B (Base and Instruct, inclusionAI; arXiv 2509.24389): the released sizes.

7.4B parameters, 1.4B active per token: 16 layers, all MoE (64 SwiGLU experts
of hidden 1024, top-8, router bias), hidden 2048, 16 heads, per-head q/k
RMSNorm, RoPE theta 50,000 over the whole head, the Ling tokenizer (vocabulary
157,184; mask 156895, EOS 156892). `llada_jax.load(DIR)` reads these from the
snapshot's config.json; this file is for training from scratch and AOT checks.
"""

from configs import llada_8b


def model_config():
  cfg = llada_8b.model_config()  # numerics and training defaults (bf16 compute, f32 master)
  cfg.update(family="llada_moe", d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16,
             mlp_hidden_size=8192,  # dense_intermediate_size (no dense layer uses it)
             vocab_size=157184, embedding_size=157184, max_sequence_length=8192,
             rope_theta=50000.0, qk_norm=True, num_experts=64, num_experts_per_tok=8,
             moe_hidden_size=1024, moe_layers=[1] * 16, expert_bias=True,
             moe_impl="auto",  # ragged_dot on TPU (also for an AOT compile), tiled on CPU
             router_aux_loss_coef=0.01, mask_token_id=156895, eos_token_id=156892,
             pad_token_id=156892, bos_token_id=None, eot_token_id=None)
  return cfg


def get_config():
  cfg = llada_8b.get_config()
  cfg.model = model_config()
  return cfg
