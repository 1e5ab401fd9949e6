"""LLaDA-8B (Base and Instruct): the released architecture, SPEC §1."""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      d_model=4096,
      n_heads=32,
      n_kv_heads=32,
      n_layers=32,
      mlp_hidden_size=12288,
      vocab_size=126464,
      embedding_size=126464,
      max_sequence_length=4096,
      rope_theta=500000.0,
      rms_norm_eps=1e-5,
      weight_tying=False,
      scale_logits=False,
      mask_token_id=126336,
      eos_token_id=126081,
      pad_token_id=126081,
      bos_token_id=126080,
      eot_token_id=126348,
      dtype="bfloat16",  # TPU default: bf16 compute,
      param_dtype="float32",  # float32 master weights
      attention="xla",
      remat_policy="full",
      scan_layers=True,
  ))


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model_config()))
