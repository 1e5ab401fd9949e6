"""SPEC §3 written plainly, for tests: Python loops over blocks, steps and rows.

`reference_generate` is the sampler `generate` documents, with none of its
machinery: a jitted model call per step, numpy everywhere else, a sort per row
for the top-k. Caches use the model's own primitives (`forward_with_cache`,
`forward_window`) and the exact windows (prefix: [block, end)), not the
compiled sampler's padded ones. Noise is drawn as `loop.py` documents (step t:
fold_in(rng, t), split into the Gumbel and the random-remasking keys, each folded
with the position's index in the generated part), so sampled runs compare token
for token.
"""

import jax
import jax.numpy as jnp
import numpy as np


class _Logits:
  """A step's logits under each cache policy, with the model's own primitives."""

  def __init__(self, model, mode):
    self.model, self.mode = model, mode
    self.full = jax.jit(model.forward_with_cache)
    self.window = jax.jit(model.forward_window)

  def __call__(self, ids, attn, cache, *, first, start, end):
    """float32 numpy logits of positions [start, end) -> (logits, cache)."""
    if self.mode == "none":
      return np.array(self.model(ids, attn), np.float32)[:, start:end], cache
    if first:  # a refresh: the full forward stores every position's keys/values
      logits, cache = self.full(ids, attn)
      return np.array(logits, np.float32)[:, start:end], cache
    window_end = end if self.mode == "dual" else ids.shape[1]
    logits, _ = self.window(ids[:, start:window_end], start, cache, attn)
    return np.array(logits, np.float32)[:, :end - start], cache


def _noise(draw, key, lo, hi):
  """[B, hi - lo, ...]: generated position j's noise is draw(fold_in(key, j))."""
  return np.stack([np.asarray(draw(jax.random.fold_in(key, j))) for j in range(lo, hi)], axis=1)


def _count(rule_value, conf_sorted, *, rule, scheduled):
  """How many of the (descending) sorted candidate confidences a row reveals."""
  if rule == "threshold":
    return max(1, int(sum(c >= rule_value for c in conf_sorted)))
  if rule == "factor":
    k = 1
    while k < len(conf_sorted) and conf_sorted[k] >= 1 - rule_value / (k + 2):
      k += 1
    return k
  return scheduled


def reference_generate(model, prompt, attn=None, *, gen_length, block_length, steps=None,
                       temperature=0., cfg_scale=0., remasking="low_confidence",
                       logits_eos_inf=False, confidence_eos_eot_inf=False, threshold=None,
                       factor=None, cache="none", rng=None, constraints=None):
  """Tokens [B, Lp + gen_length] of `generate` with these arguments (numpy)."""
  cfg = model.config
  mask_id, eos = cfg.mask_token_id, cfg.eos_token_id
  stops = [eos] + ([cfg.eot_token_id] if cfg.eot_token_id is not None else [])
  rng = jax.random.key(0) if rng is None else rng
  rule = "threshold" if threshold is not None else "factor" if factor is not None else "fixed"
  rule_value = threshold if factor is None else factor
  B, P = prompt.shape
  x = np.concatenate([prompt, np.full((B, gen_length), mask_id)], axis=1)
  for pos, tok in (constraints or {}).items():
    x[:, P + pos] = tok
  full_attn = None if attn is None else np.concatenate([attn, np.ones((B, gen_length),
                                                                      attn.dtype)], 1)
  fixed = x != mask_id
  if cfg_scale and full_attn is not None:
    full_attn = np.concatenate([full_attn, full_attn])
  step_logits = _Logits(model, cache)
  num_blocks = gen_length // block_length
  spb = steps // num_blocks if rule == "fixed" else block_length
  for b in range(num_blocks):
    lo, hi = P + b * block_length, P + (b + 1) * block_length
    n = (x[:, lo:hi] == mask_id).sum(1)
    kv = None
    for i in range(spb):
      if rule != "fixed" and not (x[:, lo:hi] == mask_id).any():
        break
      ids = np.concatenate([x, np.where(fixed, mask_id, x)]) if cfg_scale else x
      logits, kv = step_logits(ids, full_attn, kv, first=i == 0, start=lo, end=hi)
      if cfg_scale:
        logits = logits[B:] + (cfg_scale + 1) * (logits[:B] - logits[B:])
      if logits_eos_inf:
        logits[..., eos] = -np.inf
      key_g, key_r = jax.random.split(jax.random.fold_in(rng, b * spb + i))
      if temperature > 0:
        g = _noise(lambda k: jax.random.gumbel(k, (B, logits.shape[2]), jnp.float32), key_g,
                   lo - P, hi - P)
        x0 = np.argmax(logits / np.float32(temperature) + g, axis=-1)
      else:
        x0 = np.argmax(logits, axis=-1)
      if confidence_eos_eot_inf:
        logits[..., stops] = -np.inf
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p = p / p.sum(-1, keepdims=True)
      if remasking == "low_confidence":
        conf = np.take_along_axis(p, x0[..., None], -1)[..., 0]
      else:
        conf = _noise(lambda k: jax.random.uniform(k, (B,), jnp.float32), key_r, lo - P, hi - P)
      if confidence_eos_eot_inf:
        conf = np.where(np.isin(x0, stops), -np.inf, conf)
      for r in range(B):
        order = sorted(np.flatnonzero(x[r, lo:hi] == mask_id), key=lambda j: (-conf[r, j], j))
        k = _count(rule_value, [conf[r, j] for j in order], rule=rule,
                   scheduled=n[r] // spb + (i < n[r] % spb))
        for j in order[:k]:
          x[r, lo + j] = x0[r, j]
  return x
