"""LLaDA-8B pre-training, the paper's recipe (SPEC §5; arXiv 2502.09992 §2.2, B.1).

AdamW (weight decay 0.1), warmup-stable-decay: 2000 warmup steps to 4e-4,
constant, dropped to 1e-4 after 1.2T tokens, linear decay to 1e-5 over the
last 0.3T of 2.3T tokens; sequences of 4096 tokens, global batch 1280; bf16
compute with float32 master weights; 1% of batches cropped to a random length.
Tokens per step = 1280 * 4096 = 5.24M, so 2.3T tokens ≈ 438,000 steps.
"""

from configs import llada_8b
from configs import tiny

TOKENS_PER_STEP = 1280 * 4096


def get_config():
  cfg = tiny.get_config()  # the training fields; every value below is set explicitly
  cfg.model = llada_8b.model_config()
  cfg.kind = "pretrain"
  cfg.total_steps = round(2.3e12 / TOKENS_PER_STEP)
  cfg.batch_size = 1280
  cfg.micro_batches = 1
  cfg.loss_vocab_chunk = 8192  # 16 chunks of 126,464: no [B, 4096, V] float32 logits
  cfg.seq_len = 4096
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  cfg.data.update(source="tfds:c4/en:3.1.0", eval_source="", tfds_split="train",
                  tfds_eval_split="validation", data_dir="gs://YOUR_BUCKET/tensorflow_datasets",
                  field="text")
  cfg.tokenizer.update(path="", train_vocab_size=0)  # set path= LLaDA's tokenizer dir
  cfg.optimizer.update(learning_rate=4e-4, warmup_steps=2000,
                       drop_step=round(1.2e12 / TOKENS_PER_STEP), drop_learning_rate=1e-4,
                       decay_steps=round(0.3e12 / TOKENS_PER_STEP), final_learning_rate=1e-5,
                       weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  cfg.checkpoint.update(every_steps=1000, keep=3)
  cfg.log_every = 50
  cfg.eval_every = 5000
  cfg.eval_batches = 16
  cfg.eval_batch_size = 64
  cfg.samples.update(num=2, prompt_len=32, gen_length=128, steps=128)
  return cfg
