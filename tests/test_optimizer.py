"""WSD schedule, AdamW/clipping and gradient accumulation == one large batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llada_jax.config import ModelConfig
from llada_jax.models import llada as model_lib
from llada_jax.training import objectives
from llada_jax.training import optimizer


def test_wsd_schedule_shape():
  s = optimizer.wsd_schedule(4e-4, total_steps=100, warmup_steps=10, decay_steps=20,
                             final_lr=1e-5, drop_step=50, drop_lr=1e-4)
  lr = np.array([float(s(i)) for i in range(101)])
  np.testing.assert_allclose(lr[:10], 4e-4 * np.arange(1, 11) / 10, rtol=1e-6)
  np.testing.assert_allclose(lr[10:50], 4e-4, rtol=1e-6)
  np.testing.assert_allclose(lr[50:80], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(lr[80:], 1e-4 + (1e-5 - 1e-4) * np.arange(21) / 20, rtol=1e-5)
  assert float(optimizer.wsd_schedule(1.0, 10, 2, scale=0.5)(5)) == 0.5


def test_wsd_schedule_rejects_bad_lengths():
  with pytest.raises(ValueError, match="exceed total_steps"):
    optimizer.wsd_schedule(1e-3, total_steps=10, warmup_steps=8, decay_steps=5)


def test_adamw_clips_and_decays():
  tx = optimizer.make_optimizer(lambda _: 0.1, weight_decay=0.5, clip_norm=1.0)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([300.0, 400.0])}  # norm 500, clipped to 1
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(g) (+ decoupled decay lr * wd * w).
  want = -0.1 * (np.sign([3.0, 4.0]) + 0.5 * np.array([1.0, -2.0]))
  np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-4, atol=1e-6)
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(params))
  np.testing.assert_allclose(np.asarray(clipped["w"]), [0.6, 0.8], rtol=1e-6)


@pytest.mark.slow
def test_accumulation_equals_one_large_batch():
  cfg = ModelConfig(d_model=32, n_heads=2, n_kv_heads=1, n_layers=2, mlp_hidden_size=64,
                    vocab_size=64, embedding_size=64, max_sequence_length=16,
                    mask_token_id=3, eos_token_id=2, pad_token_id=2, bos_token_id=1,
                    eot_token_id=None)
  graphdef, params = nnx.split(model_lib.init(cfg, seed=0))
  params = nnx.to_pure_dict(params)
  ids_BL = jax.random.randint(jax.random.key(0), (8, 16), 4, 64)
  noise = objectives.pretrain_noise(jax.random.key(1), ids_BL, cfg.mask_token_id)

  def loss_fn(p, batch):
    ids, nz = batch
    logits = nnx.merge(graphdef, p).forward(nz.noisy_BL, nz.attention_mask_BL)
    loss = objectives.masked_loss(logits, ids, nz)
    return loss, {"masked": jnp.sum(nz.masked_BL)}

  run = jax.jit(optimizer.accumulate_gradients, static_argnums=(0, 3))
  loss1, grads1, aux1 = run(loss_fn, params, (ids_BL, noise), 1)
  loss4, grads4, aux4 = run(loss_fn, params, (ids_BL, noise), 4)
  np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
  assert int(aux4["masked"]) == int(aux1["masked"]) > 0
  for g1, g4 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
    np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-4, atol=2e-6)  # float32 sum order
  with pytest.raises(ValueError, match="micro-batches"):
    run(loss_fn, params, (ids_BL, noise), 3)
