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
  """The embedded default: tokenizer + small LLaDA on Python's docs, ~minutes on 2 cores."""
  return ml_collections.ConfigDict(dict(
      model=model_config(),
      # "pretrain" | "sft" (SPEC §5) | "block_pretrain" | "block_sft" | "vrpo" (training/vrpo.py)
      kind="pretrain",
      # Block diffusion (block kinds; training/block_objectives.py):
      block_length=0,  # block size, divides seq_len (required by the block kinds)
      t_min=0.0,  # per-block noise level t ~ U[t_min, t_max] (mask-ratio bandwidth)
      t_max=1.0,
      complementary_masking=False,  # each row and its complement mask: 2x the rows
      embed_noise_std=0.0,  # N(0, std^2) on the masked tokens' embeddings (0 = off)...
      embed_noise_steps=0,  # ...during the first this many steps
      cap_weight=0.0,  # sft / block_sft: weight of the CAP entropy term (0 = off)
      seed=0,
      total_steps=1000,
      batch_size=16,  # global batch, rows
      micro_batches=1,  # gradient accumulation
      loss_vocab_chunk=0,  # >0: cross-entropy over vocabulary chunks, no [B, L, V] logits
      seq_len=128,
      init_from="",  # a model dir (HF snapshot, converted dir or workdir)
      # Devices per slice on each axis (-1 = the rest), times dcn_* slices (multi-slice).
      mesh=ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1)),
      reference_from="",  # kind="vrpo": the frozen reference model dir (default: init_from)
      vrpo=ml_collections.ConfigDict(dict(
          n_samples=8,  # ELBO samples per answer and model (the budget n)
          allocation="optimal",  # "optimal": n timesteps x 1 mask; "naive": 1 timestep x n masks
          antithetic=True,  # the policy and the reference share timesteps and masks
          beta=0.1,  # DPO's β
      )),
      data=ml_collections.ConfigDict(dict(
          source="pydoc_data.topics",  # see llada_jax/data.py
          eval_source="",  # default: a held-out fraction of `source`
          eval_fraction=0.05,
          tfds_split="train",
          tfds_eval_split="validation",
          data_dir="",
          field="text",
          prefetch=2,  # batches a background thread keeps ready (0 = none)
      )),
      tokenizer=ml_collections.ConfigDict(dict(
          path="",  # tokenizer dir/file; default: init_from's, else trained here
          train_vocab_size=2048,  # SentencePiece trained on the training documents
      )),
      optimizer=ml_collections.ConfigDict(dict(
          learning_rate=3e-3,
          warmup_steps=100,
          decay_steps=300,
          final_learning_rate=3e-4,
          drop_step=-1,
          drop_learning_rate=3e-3,
          weight_decay=0.1,
          b1=0.9,
          b2=0.99,
          eps=1e-8,
          clip_norm=1.0,
      )),
      checkpoint=ml_collections.ConfigDict(dict(every_steps=500, keep=2)),
      max_nonfinite_in_a_row=3,  # then roll back to the last checkpoint
      rollback_lr_scale=0.5,
      max_rollbacks=5,  # then stop with an error
      log_every=50,
      eval_every=500,
      eval_batches=8,
      eval_batch_size=16,
      eval_samples=2,  # Monte Carlo draws of the noise per held-out batch
      peak_flops=0.0,  # per device; 0 = spec sheet (TPU) or a measured matmul
      samples=ml_collections.ConfigDict(dict(num=2, prompt_len=16, gen_length=32, steps=32)),
      distributed=False,  # force jax.distributed.initialize() (auto on multi-host TPU)
  ))
