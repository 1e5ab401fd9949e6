"""LLaDA-8B supervised fine-tuning, the paper's recipe (SPEC §5; arXiv 2502.09992 §2.3, B.2).

Starts from the pre-trained weights (`--config.init_from=DIR`: an HF snapshot,
converted dir or training workdir) on chat data (JSONL with `messages`, or
`prompt`/`response`); the prompt is never masked and the EOS padding of the
answer is trained. 3 epochs of 4.5M pairs at global batch 256 in the paper
(here batch 1280 x 4096 as asked; change `batch_size` for smaller slices);
warmup 50 steps to 2.5e-5, constant, linear decay to 2.5e-6 over the last 10%.
"""

from configs import llada_8b_pretrain


def get_config():
  cfg = llada_8b_pretrain.get_config()
  cfg.kind = "sft"
  cfg.init_from = ""  # required: the pre-trained model directory
  cfg.total_steps = 10_000
  cfg.data.update(source="sft/*.jsonl", eval_source="", eval_fraction=0.005)
  cfg.optimizer.update(learning_rate=2.5e-5, warmup_steps=50, drop_step=-1,
                       drop_learning_rate=2.5e-5, decay_steps=1000, final_learning_rate=2.5e-6)
  cfg.checkpoint.update(every_steps=500, keep=3)
  cfg.eval_every = 1000
  return cfg
