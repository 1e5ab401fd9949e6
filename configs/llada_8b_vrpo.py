"""LLaDA 1.5: VRPO on LLaDA-8B-Instruct (arXiv 2505.19223; llada_jax/training/vrpo.py).

Starts from the SFT model (`--config.init_from=DIR`: GSAI-ML/LLaDA-8B-Instruct,
converted or as an HF snapshot), which is also the frozen reference; data are
preference pairs (JSONL: `prompt` or `messages`, with `chosen` and `rejected`).
The paper's variance reduction: a budget of n = 8 ELBO samples per answer with
optimal allocation (8 timesteps, one mask each) and antithetic sampling (the
policy and the reference see the same timesteps and masks).

Checked (2026-12, public sources reachable from here): the project page
(ml-gsai.github.io/LLaDA-1.5-Demo) confirms the three techniques — a larger
budget n = n_time × n_mask, optimal allocation n_time = n, n_mask = 1, and
antithetic sampling shared between π_θ and π_ref; the abstract (arXiv
2505.19223; ACL 2026 long 524) states no hyperparameters. n = 8, β, the
learning rate and its schedule, the batch of 64 pairs and one epoch over ~350K
pairs are as we read the paper's experimental setup and could NOT be confirmed
against a searchable copy of the paper or its code (github ML-GSAI/LLaDA-1.5
is not in the index): verify them (and the data) before a real run.
"""

from configs import llada_8b_sft

PAIRS = 350_000


def get_config():
  cfg = llada_8b_sft.get_config()
  cfg.kind = "vrpo"
  cfg.init_from = ""  # required: LLaDA-8B-Instruct's directory
  cfg.reference_from = ""  # default: init_from
  cfg.vrpo.update(n_samples=8, allocation="optimal", antithetic=True, beta=0.1)
  cfg.batch_size = 64  # pairs per step; 2 answers x 8 samples = 1024 rows through each model
  cfg.micro_batches = 8  # 128 rows per model per micro-batch (raise for smaller slices)
  cfg.seq_len = 4096
  cfg.total_steps = PAIRS // cfg.batch_size  # one epoch
  cfg.data.update(source="preferences/*.jsonl", eval_source="", eval_fraction=0.005)
  cfg.optimizer.update(learning_rate=5e-7, warmup_steps=15, drop_step=-1,
                       drop_learning_rate=5e-7, decay_steps=0, final_learning_rate=5e-7,
                       weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0)
  cfg.checkpoint.update(every_steps=200, keep=3)
  cfg.eval_every = 500
  cfg.eval_batch_size = 64
  cfg.eval_batches = 4
  cfg.samples.num = 0
  return cfg
