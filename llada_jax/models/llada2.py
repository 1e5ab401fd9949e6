"""LLaDA2.x (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1): block-diffusion MoE mask predictors.

Per layer, as the released `modeling_llada2_moe.py` computes it (pre-norm):
  q, k, v = split(query_key_value(n1)) by heads [N, K, K],   n1 = input_layernorm(x)
  h = x + dense(Attn(RoPE(query_layernorm(q)), RoPE(key_layernorm(k)), v))
  y = h + MoE(n2) + shared_experts(n2)   (a dense SwiGLU on the first
      first_k_dense_replace layers),      n2 = post_attention_layernorm(h)
then `norm` and `lm_head`. query/key_layernorm are per-head RMSNorms over
head_dim; RoPE rotates the first int(head_dim * partial_rotary_factor) dims.
The router, in float32 (`layers.moe.route_sigmoid_grouped`): s = sigmoid(gate(n2)),
experts chosen by the group-limited top-k of s + expert_bias (the bias only
selects), combine weights s[ids] / sum * routed_scaling_factor.

Attention is bidirectional without a mask (as the release with
attention_mask=None), over real keys with a {0,1} padding mask, and
block-causal with `block_length` (`layers.masks`): what the official
block-diffusion generate passes, and what `sampling/block.py` runs on its KV
cache. The fused `query_key_value` HF tensor is three Flax parameters
(q_proj, k_proj, v_proj: rows [0, N·H), [N·H, (N+K)·H), [(N+K)·H, (N+2K)·H)),
so the attention sublayer and the sharding rules are those of every family.
Parameters as in `llada_moe`: blocks/ (every layer), dense/ (stack Z), moe/ (stack M).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from llada_jax.config import ModelConfig
from llada_jax.layers.masks import BlockCausal
from llada_jax.layers import params as params_lib
from llada_jax.layers.params import ParamSpec
from llada_jax.models import llada, llada_moe

_L = "model.layers.{i}."
_QKV = ("NH", "KH", "KH")  # rows of query_key_value: q, k, v


def _layer(path, dims, axes, init, hf, lin=0, fan="", stack="Y", present=lambda cfg: True,
           part=None):
  fused = {} if part is None else {"hf_parts": _QKV, "hf_part": part}
  return ParamSpec(path, dims, axes, init, _L + hf, lin, fan, present, stack, **fused)


_QKV_HF = "attention.query_key_value.weight"
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("wte", "VD", ("vocab", "embed"), "embed", "model.word_embeddings.weight"),
    *llada_moe.attention_params(_layer, {
        "blocks/attn_norm": "input_layernorm.weight", "blocks/q_proj": _QKV_HF,
        "blocks/k_proj": _QKV_HF, "blocks/v_proj": _QKV_HF,
        "blocks/q_norm": "attention.query_layernorm.weight",
        "blocks/k_norm": "attention.key_layernorm.weight",
        "blocks/attn_out": "attention.dense.weight",
        "blocks/ff_norm": "post_attention_layernorm.weight",
    }, q_proj={"part": 0}, k_proj={"part": 1}, v_proj={"part": 2}),
    *llada_moe.ffn_params(_layer, expert_bias="mlp.gate.expert_bias",
                          shared="mlp.shared_experts"),
    ParamSpec("ln_f", "D", ("embed",), "ones", "model.norm.weight"),
    ParamSpec("ff_out", "DV", ("embed", "vocab"), "normal", "lm_head.weight", 1, "D",
              present=lambda cfg: not cfg.weight_tying),
)

layer_ids = llada_moe.layer_ids
dim_sizes = llada_moe.dim_sizes


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
  """The table entries this config has."""
  return params_lib.present_specs(PARAMS, cfg)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter, keyed by path (stacked ones with their layers axis first)."""
  return params_lib.shapes(param_specs(cfg), dim_sizes(cfg))


def attention_mask(mask_BS: jax.Array | None, block_length: int | None, start=0):
  """The mask the layers take: the {0,1} key mask as is (bidirectional), or with
  `block_length` a `BlockCausal` (queries from absolute position `start`)."""
  if block_length is None:
    return mask_BS
  return BlockCausal(block_length, None if mask_BS is None else jnp.asarray(mask_BS), start)


class Transformer(llada_moe.Transformer):
  """The LLaDA2 mask predictor: token ids [B, L] -> float32 logits [B, L, V].

  Every forward takes `block_length` (static int or None): None attends
  bidirectionally (over real keys), an int block-causally (`layers.masks`).
  """

  def forward(self, input_ids_BL, attention_mask_BL=None, block_length: int | None = None,
              segments=None):
    mask = attention_mask(attention_mask_BL, block_length)
    return self._run(input_ids_BL, mask, 0, None, return_kv=False, segments=segments)[0]

  def forward_with_aux(self, input_ids_BL, attention_mask_BL=None, head: bool = True,
                       block_length: int | None = None, **training_inputs):
    """`llada.Transformer.forward_with_aux` (`training_inputs`: positions_L,
    embed_noise_BLD), block-causal with `block_length`."""
    return super().forward_with_aux(input_ids_BL, attention_mask(attention_mask_BL, block_length),
                                    head, **training_inputs)

  def forward_with_cache(self, input_ids_BL, attention_mask_BL=None,
                         block_length: int | None = None, segments=None):
    mask = attention_mask(attention_mask_BL, block_length)
    return self._run(input_ids_BL, mask, 0, None, return_kv=True, segments=segments)[:2]

  def forward_window(self, window_ids_BW, start, cache, attention_mask_BS=None,
                     fresh_from=None, block_length: int | None = None, segments=None):
    """`llada.Transformer.forward_window`; with `block_length` the window's
    queries (positions start…) see the cached keys of their block and before only."""
    mask = attention_mask(attention_mask_BS, block_length, start)
    return self._run(window_ids_BW, mask, start, cache, return_kv=True,
                     fresh_from=fresh_from, segments=segments)[:2]

  def __call__(self, input_ids, attention_mask=None, block_length: int | None = None):
    """Jitted forward: int [B, L] (+ {0,1} mask [B, L]) -> float32 [B, L, V]."""
    graphdef, state = nnx.split(self)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return _apply(graphdef, state, jnp.asarray(input_ids, jnp.int32), mask, block_length)


@functools.partial(jax.jit, static_argnames=("block_length",))
def _apply(graphdef, state, input_ids_BL, attention_mask_BL, block_length):
  return nnx.merge(graphdef, state).forward(input_ids_BL, attention_mask_BL, block_length)


# ------------------------------------------------------------ config.json mapping

# Keys whose value must be this for the model here to compute what the release does.
_HF_REQUIRED = {"hidden_act": "silu", "use_qkv_bias": False, "use_bias": False,
                "rope_scaling": None, "use_rmsnorm": True, "norm_head": False,
                "use_sliding_window": False}
# Keys the released forward does not read: a value other than the release's only warns.
_HF_IGNORED = {"score_function": "sigmoid", "router_dtype": "fp32", "norm_topk_prob": True,
               "moe_router_enable_expert_bias": True, "norm_softmax": False}
_HF_FIELDS = {  # HF key -> ModelConfig field
    **llada_moe.HF_FIELDS_SHARED,
    "intermediate_size": "mlp_hidden_size", "use_qk_norm": "qk_norm",
    "head_dim": "explicit_head_dim", "moe_intermediate_size": "moe_hidden_size",
    "n_group": "n_group", "topk_group": "topk_group",
    "routed_scaling_factor": "routed_scaling_factor",
}
_HF_MISSING = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
               "num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")


def _check_release_keys(hf: Mapping[str, Any]) -> None:
  for key, want in _HF_REQUIRED.items():
    if key in hf and hf[key] != want:
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported by llada_jax's "
                       f"LLaDA2 (only {want!r})")
  for key, default in _HF_IGNORED.items():
    if key in hf and hf[key] != default:
      logging.warning("config.json: %s=%r is not read by the released LLaDA2 forward; "
                      "ignored (it computes as with %r)", key, hf[key], default)
  missing = [k for k in _HF_MISSING if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json: missing required key(s) {', '.join(missing)}")
  if not hf.get("num_key_value_heads", 1):
    raise ValueError("config.json: num_key_value_heads=0 (the config class default) gives "
                     "no key/value heads; give the checkpoint's value")
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rotary = int(head_dim * hf.get("partial_rotary_factor", 0.5))
  if hf.get("rotary_dim") not in (None, rotary):
    logging.warning("config.json: rotary_dim=%s is not read by the released LLaDA2 forward; "
                    "RoPE rotates int(head_dim * partial_rotary_factor) = %d dims",
                    hf["rotary_dim"], rotary)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> dict[str, Any]:
  """ModelConfig fields of a LLaDA2 `config.json` (+ `overrides`, which win); refuses
  what is not implemented, warns on keys the release ignores.

  Special ids: config.json (the released ones have pad = eos only), the
  tokenizer files (`config_from_model_dir`), then the Ling tokenizer's mask id.
  """
  _check_release_keys(hf)
  values: dict[str, Any] = {"family": "llada2", "router": "sigmoid_grouped",
                            "expert_bias": True, "qk_norm": True,
                            "partial_rotary_factor": 0.5}  # the config class defaults
  for key, field in _HF_FIELDS.items():
    if hf.get(key) is not None:
      values[field] = hf[key]
  n_layers, first_dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
  if not 0 <= first_dense <= n_layers:
    raise ValueError(f"config.json: first_k_dense_replace={first_dense} is not in "
                     f"[0, num_hidden_layers={n_layers}]")
  values["moe_layers"] = (0,) * first_dense + (1,) * (n_layers - first_dense)
  values.setdefault("n_kv_heads", hf["num_attention_heads"])
  values["embedding_size"] = hf["vocab_size"]
  values["shared_expert_hidden_size"] = (hf.get("num_shared_experts") or 0) * hf[
      "moe_intermediate_size"]
  values["eot_token_id"] = None
  values.setdefault("bos_token_id", None)
  if "eos_token_id" not in values and "pad_token_id" in values:
    values["eos_token_id"] = values["pad_token_id"]  # released: pad = eos = <|endoftext|>
  if "pad_token_id" not in values and "eos_token_id" in values:
    values["pad_token_id"] = values["eos_token_id"]
  values.update(overrides)
  return llada_moe.ling_special_ids(values, hf["vocab_size"])


def config_to_hf(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
  """The HF `config.json` dict of a LLaDA2 config (the keys of the release)."""
  first_dense = cfg.moe_layers.index(1) if 1 in cfg.moe_layers else cfg.n_layers
  if cfg.moe_layers != (0,) * first_dense + (1,) * (cfg.n_layers - first_dense):
    raise ValueError(f"ModelConfig.moe_layers={cfg.moe_layers}: LLaDA2's config.json has "
                     "only first_k_dense_replace (dense layers first, then MoE)")
  if cfg.shared_expert_hidden_size % max(cfg.moe_hidden_size, 1):
    raise ValueError(f"ModelConfig.shared_expert_hidden_size={cfg.shared_expert_hidden_size} "
                     f"is not a multiple of moe_hidden_size={cfg.moe_hidden_size} "
                     "(num_shared_experts)")
  hf: dict[str, Any] = {
      **llada_moe.remote_code_keys("llada2_moe", "llada2_moe", "LLaDA2MoeConfig",
                                   "LLaDA2MoeModel", "LLaDA2MoeModelLM"),
      "hidden_act": "silu", "use_qkv_bias": False,
      "use_bias": False, "use_rmsnorm": True, "norm_head": False, "norm_softmax": False,
      "rope_scaling": None, "use_sliding_window": False, "use_cache": False,
      "score_function": "sigmoid", "router_dtype": "fp32", "norm_topk_prob": True,
      "moe_router_enable_expert_bias": True, "first_k_dense_replace": first_dense,
      "num_shared_experts": cfg.shared_expert_hidden_size // max(cfg.moe_hidden_size, 1),
      "rotary_dim": cfg.rotary_dim, "head_dim": cfg.head_dim,
      "torch_dtype": torch_dtype or cfg.param_dtype,
  }
  for key, field in _HF_FIELDS.items():
    value = getattr(cfg, field)
    if value is not None:
      hf[key] = value
  hf["head_dim"] = cfg.head_dim
  return dict(sorted(hf.items()))

