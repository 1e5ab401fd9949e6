"""The optimiser: AdamW on a warmup-stable-decay schedule, clipping, accumulation.

LLaDA's recipe (SPEC §5): linear warmup to the peak learning rate, constant,
optionally a drop to a lower constant, then a linear decay to the final rate.
Gradient accumulation runs the micro-batches under `lax.scan` and sums their
gradients; the objectives normalise by the global batch, so the sum is
exactly the gradient of one large batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 decay_steps: int = 0, final_lr: float = 0.0,
                 drop_step: int = -1, drop_lr: float | None = None,
                 scale: float = 1.0) -> optax.Schedule:
  """Warmup-stable-decay learning rate, times `scale`.

  0 → peak_lr linearly over `warmup_steps`; peak_lr until `drop_step`
  (if ≥ 0), then `drop_lr`; from `total_steps - decay_steps` a linear decay
  to `final_lr` at `total_steps`, constant after.
  """
  for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps),
                      ("decay_steps", decay_steps)):
    if value < 0:
      raise ValueError(f"wsd_schedule: {name}={value} is negative")
  if warmup_steps + decay_steps > total_steps:
    raise ValueError(f"wsd_schedule: warmup_steps={warmup_steps} + decay_steps={decay_steps}"
                     f" exceed total_steps={total_steps}")
  drop_lr = peak_lr if drop_lr is None else drop_lr
  decay_start = total_steps - decay_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
    stable = jnp.where((drop_step >= 0) & (step >= drop_step), drop_lr, peak_lr)
    start_lr = drop_lr if 0 <= drop_step <= decay_start else peak_lr
    frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    decay = start_lr + (final_lr - start_lr) * frac
    lr = jnp.where(step < warmup_steps, warm, jnp.where(step < decay_start, stable, decay))
    return scale * lr
  return schedule


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decay on every weight, as in LLaDA)."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def from_config(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from a config's `optimizer` and `total_steps` fields.

  A rollback's lower learning rate is not baked in here: the train step scales
  the updates by a traced factor, so it keeps its compiled program.
  """
  o = cfg.optimizer
  schedule = wsd_schedule(o.learning_rate, cfg.total_steps, o.warmup_steps, o.decay_steps,
                          o.final_learning_rate, o.drop_step, o.drop_learning_rate)
  tx = make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                      clip_norm=o.clip_norm)
  return tx, schedule


def accumulate_gradients(loss_fn: Callable[..., tuple[jax.Array, Any]], params: Any,
                         batch: Any, num_micro: int) -> tuple[jax.Array, Any, Any]:
  """Σ over micro-batches of `loss_fn(params, micro_batch) -> (loss, aux)` and its grad.

  Every leaf of `batch` has the batch on axis 0, split into `num_micro`
  equal parts (scanned, so memory is one micro-batch). The loss must already
  be normalised by the global batch so that sums give the full-batch value.
  Returns (loss, grads, aux summed over micro-batches).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, grads, aux

  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} does not split into {num_micro} micro-batches")
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])
  micro = jax.tree.map(split, batch)
  (loss0, aux0), grads0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

  def body(carry, mb):
    (loss, aux), grads = grad_fn(params, mb)
    acc_loss, acc_grads, acc_aux = carry
    return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads),
            jax.tree.map(jnp.add, acc_aux, aux)), None

  (loss, grads, aux), _ = jax.lax.scan(body, (zeros(loss0), zeros(grads0), zeros(aux0)), micro)
  return loss, grads, aux
