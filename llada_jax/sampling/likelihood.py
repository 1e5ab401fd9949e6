"""`log_likelihood`: the Monte Carlo ELBO estimate of log p(answer | prompt) (SPEC §4).

Per mini-batch of b rows: k ~ U{1..T} (T = answer length), row j masks exactly
l_j = wrap(floor(k + jT/b + 1/2)) answer positions chosen uniformly (the
prompt never), loss = Σ_rows Σ_masked CE / (l_j / T) / b; the estimate is
−mean over mc_num / b mini-batches. Half-up rounding keeps l_j uniform over
{1..T}, so the estimate is unbiased; the reference's round-half-to-even is not.

Many (prompt, answer) pairs of different lengths run together: they are
right-padded (so positions and RoPE match the unpadded sequences) with an
attention mask, and each forward scores one mini-batch of every pair in a
chunk. The loop over mini-batches is a `lax.fori_loop` in one jitted program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llada_jax.sampling import common
from llada_jax.sampling import decoding

# At most this many rows (pairs x batch_size) per forward; more pairs run in chunks.
MAX_ROWS_PER_FORWARD = 64


@dataclasses.dataclass(frozen=True)
class _Settings:
  num_batches: int  # mc_num // batch_size
  batch_size: int
  cfg: bool


def mask_counts(k_N: jax.Array, T_N: jax.Array, b: int) -> jax.Array:
  """int [N, b]: l_j = ((floor(k + jT/b + 1/2) - 1) mod T) + 1, in exact integer arithmetic."""
  j_b = jnp.arange(b, dtype=jnp.int32)
  l_Nb = k_N[:, None] + (2 * j_b[None, :] * T_N[:, None] + b) // (2 * b)
  return (l_Nb - 1) % T_N[:, None] + 1


def _ll_loop(graphdef, state, seq_NL, prompt_len_N, answer_len_N, pair_index_N, attn_NL, rng,
             cfg_scale, s: _Settings):
  model = nnx.merge(graphdef, state)
  mask_id = model.config.mask_token_id
  N, L = seq_NL.shape
  b = s.batch_size
  pos_L = jnp.arange(L, dtype=jnp.int32)
  prompt_NL = pos_L < prompt_len_N[:, None]
  answer_NL = ~prompt_NL & (pos_L < (prompt_len_N + answer_len_N)[:, None])
  rows = lambda a_N: jnp.repeat(a_N, b, axis=0)  # row n * b + j belongs to pair n
  seq_RL, answer_RL, prompt_RL = rows(seq_NL), rows(answer_NL), rows(prompt_NL)
  attn_RL = None if attn_NL is None else rows(attn_NL)

  def one_batch(m, total_N):
    keys_N = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(rng, n), m))(pair_index_N)
    k_N = jax.vmap(lambda key, t: jax.random.randint(jax.random.fold_in(key, 0), (), 1, t + 1)
                   )(keys_N, answer_len_N)
    l_R = mask_counts(k_N, answer_len_N, b).reshape(-1)
    # Noise drawn per position, so a pair's draws do not depend on the padded length.
    noise_LNb = jax.vmap(lambda p: jax.vmap(
        lambda key: jax.random.uniform(jax.random.fold_in(key, p + 1), (b,)))(keys_N))(pos_L)
    noise_RL = noise_LNb.reshape(L, N * b).T
    masked_RL = decoding.topk_mask(noise_RL, l_R, answer_RL)  # a uniform l-subset per row
    x_RL = jnp.where(masked_RL, mask_id, seq_RL)
    if s.cfg:
      logits_RLV = common.guided_logits(model, x_RL, attn_RL, prompt_RL, cfg_scale)
    else:
      logits_RLV = model.forward(x_RL, attn_RL)
    target_RL = jnp.take_along_axis(logits_RLV, seq_RL[..., None], axis=-1)[..., 0]
    ce_RL = jax.nn.logsumexp(logits_RLV, axis=-1) - target_RL
    p_mask_R = l_R.astype(jnp.float32) / rows(answer_len_N).astype(jnp.float32)
    loss_R = jnp.sum(jnp.where(masked_RL, ce_RL, 0.0), axis=1) / p_mask_R
    return total_N + loss_R.reshape(N, b).sum(axis=1) / b

  total_N = jax.lax.fori_loop(0, s.num_batches, one_batch, jnp.zeros((N,), jnp.float32))
  return -total_N / s.num_batches


_ll_loop_jit = jax.jit(_ll_loop, static_argnames=("s",))


def _one_sequence(name: str, ids, embedding_size: int, allow_empty: bool) -> np.ndarray:
  arr = np.asarray(ids)
  if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(f"{name}: expected a 1-D sequence of integer token ids, got "
                     f"{arr.dtype} {arr.shape}")
  if arr.size == 0 and not allow_empty:
    raise ValueError(f"{name}: is empty")
  common.check_ids(name, arr, embedding_size)
  return arr.astype(np.int32)


def _is_single(ids) -> bool:
  if isinstance(ids, (np.ndarray, jax.Array)):
    return ids.ndim == 1
  return all(isinstance(i, (int, np.integer)) for i in ids)


def _pairs(prompt_ids, answer_ids, embedding_size):
  single = _is_single(answer_ids)
  if single != _is_single(prompt_ids):
    raise ValueError("prompt_ids, answer_ids: pass two 1-D id sequences for one pair, "
                     "or two equal-length lists of them")
  if single:
    prompt_ids, answer_ids = [prompt_ids], [answer_ids]
  prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
  if len(prompt_ids) != len(answer_ids) or not answer_ids:
    raise ValueError(f"prompt_ids, answer_ids: {len(prompt_ids)} prompts and "
                     f"{len(answer_ids)} answers (need equal, non-zero counts)")
  prompts = [_one_sequence(f"prompt_ids[{i}]", p, embedding_size, True)
             for i, p in enumerate(prompt_ids)]
  answers = [_one_sequence(f"answer_ids[{i}]", a, embedding_size, False)
             for i, a in enumerate(answer_ids)]
  return prompts, answers, single


def log_likelihood(model, prompt_ids, answer_ids, *, mc_num: int = 128, batch_size: int = 16,
                   cfg_scale: float = 0., rng: Any = None, pad_to: int | None = None):
  """Monte Carlo estimate of log p(answer | prompt) in nats (SPEC §4), unbiased.

  Args:
    model: a `Transformer` (sharded on a mesh or not).
    prompt_ids, answer_ids: 1-D int sequences for one pair, or equal-length
      lists of them for many (lengths may differ; padded internally).
    mc_num: Monte Carlo samples per pair (a multiple of the mini-batch size).
    batch_size: rows per mini-batch, sharing one stratified draw of k
      (clipped to mc_num, so mc_num=1 scores with a single row).
    cfg_scale: unsupervised classifier-free guidance (0 = off).
    rng: a jax PRNG key or int seed (None = key 0); pair i, mini-batch m draws
      from fold_in(fold_in(rng, i), m), whatever else is in the call.
    pad_to: pad the pairs to at least this many tokens (capped at the model's
      max_sequence_length), so that calls with different lengths share one
      compiled program; the padding is masked and changes no draw.
  Returns:
    A float for one pair, else float32 [num_pairs].
  """
  cfg = model.config
  prompts, answers, single = _pairs(prompt_ids, answer_ids, cfg.embedding_size)
  mc_num = common.positive_int("mc_num", mc_num)
  batch_size = min(common.positive_int("batch_size", batch_size), mc_num)
  if mc_num % batch_size:
    raise ValueError(f"mc_num: {mc_num} is not a multiple of batch_size={batch_size}")
  if not np.isfinite(cfg_scale) or cfg_scale < 0:
    raise ValueError(f"cfg_scale: expected a finite number >= 0, got {cfg_scale!r}")
  lengths = np.array([len(p) + len(a) for p, a in zip(prompts, answers)])
  if lengths.max() > cfg.max_sequence_length:
    i = int(lengths.argmax())
    raise ValueError(f"prompt_ids[{i}], answer_ids[{i}]: length {lengths[i]} exceeds "
                     f"max_sequence_length={cfg.max_sequence_length}")
  L = int(lengths.max())
  if pad_to is not None:
    L = max(L, min(common.positive_int("pad_to", pad_to), cfg.max_sequence_length))
  n_pairs = len(answers)
  chunk = max(1, min(n_pairs, MAX_ROWS_PER_FORWARD // batch_size))
  order = np.arange(-(-n_pairs // chunk) * chunk) % n_pairs  # last chunk padded by repeats
  seq_NL = np.full((len(order), L), cfg.eos_token_id, np.int32)
  for row, i in enumerate(order):
    seq = np.concatenate([prompts[i], answers[i]])
    seq_NL[row, :len(seq)] = seq
  prompt_len_N = np.array([len(prompts[i]) for i in order], np.int32)
  answer_len_N = np.array([len(answers[i]) for i in order], np.int32)
  attn_NL = None
  if (lengths != L).any():  # right padding, masked as keys
    attn_NL = (np.arange(L) < lengths[order][:, None]).astype(np.int32)
  settings = _Settings(mc_num // batch_size, batch_size, float(cfg_scale) > 0)
  graphdef, state = nnx.split(model)
  key = common.as_key(rng)
  out = []
  for start in range(0, len(order), chunk):
    part = slice(start, start + chunk)
    out.append(_ll_loop_jit(
        graphdef, state, common.place_batch(model, seq_NL[part]),
        jnp.asarray(prompt_len_N[part]), jnp.asarray(answer_len_N[part]),
        jnp.asarray(order[part], jnp.int32),
        common.place_batch(model, None if attn_NL is None else attn_NL[part]),
        key, jnp.float32(cfg_scale), s=settings))
  result = np.concatenate([np.asarray(o) for o in out])[:n_pairs]
  return float(result[0]) if single else result
