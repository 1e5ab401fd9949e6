"""A tiny LLaDA for tests and CPU demos (trains in minutes on 2 cores)."""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      d_model=128,
      n_heads=4,
      n_kv_heads=2,
      n_layers=4,
      mlp_hidden_size=384,
      vocab_size=2048,
      embedding_size=2048,
      max_sequence_length=256,
      rope_theta=10000.0,
      rms_norm_eps=1e-5,
      weight_tying=False,
      scale_logits=False,
      # SentencePiece models trained by `python -m llada_jax.tokenizer train`
      # reserve these ids (see llada_jax/tokenizer.py).
      pad_token_id=2,  # LLaDA pads with EOS
      bos_token_id=1,
      eos_token_id=2,
      mask_token_id=3,
      eot_token_id=6,
      dtype="float32",
      param_dtype="float32",
      attention="xla",
      remat_policy="none",
      scan_layers=True,
  ))


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model_config()))
