"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B): the LLaDA mask predictor with routed experts.

Per layer, as the released modeling code computes it (pre-norm):
  h = x + o_proj(Attn(RoPE(q_norm(q n1)), RoPE(k_norm(k n1)), v n1)),   n1 = input_layernorm(x)
  y = h + MoE(n2) [+ shared_expert(n2)]   (a dense SwiGLU on dense layers), n2 = post_attention_layernorm(h)
then `norm` and `lm_head`. q_norm/k_norm are per-head RMSNorms over head_dim
(`qk_layernorm`); RoPE rotates the first int(head_dim * partial_rotary_factor)
dims; attention is bidirectional. The router, in float32: p = softmax(gate(n2)),
p += expert_bias, (w, e) = top-k(p) -- the combine weights keep the bias and are
not renormalised (`layers.moe.route_softmax_biased`). Experts are SwiGLU MLPs
run by the dropless grouped dispatch of `layers.moe`. The release ignores
attention_mask; here padded keys are masked as in the dense model.

Layers are MoE or dense by `moe_layers` (config.json `moe_layer_freq`); each
run of consecutive layers of one kind is one `lax.scan`. Parameters: the
attention weights of every layer stacked under `blocks/` (stack Y), the
dense MLPs under `dense/` (stack Z), the routers and experts under `moe/`
(stack M; experts on an `experts` axis). Sizes: E experts, X expert hidden,
S shared-expert hidden, F dense hidden.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Mapping

import jax

from llada_jax import sharding
from llada_jax.config import ModelConfig
from llada_jax.layers import moe as moe_lib
from llada_jax.layers.masks import key_mask
from llada_jax.layers.mlp import swiglu
from llada_jax.layers import params as params_lib
from llada_jax.layers.params import ParamSpec
from llada_jax.models import llada

# Mask id of the Ling tokenizer (LLaDA-MoE, LLaDA2), and its vocabulary size.
LING_VOCAB_SIZE = 157184
LING_MASK_TOKEN_ID = 156895

_L = "model.layers.{i}."


def _layer(path, dims, axes, init, hf, lin=0, fan="", stack="Y", present=lambda cfg: True):
  return ParamSpec(path, dims, axes, init, _L + hf, lin, fan, present, stack)


def _has_dense(cfg):
  return 0 in cfg.moe_layers


def _has_moe(cfg):
  return 1 in cfg.moe_layers


def _has_shared(cfg):
  return _has_moe(cfg) and cfg.shared_expert_hidden_size > 0


# The attention entries of every layer (stack Y): (path, dims, axes, init, linear_in_dims,
# fan_in, present); families differ in the HF names (`attention_params`).
_ATTENTION_ROWS = (
    ("blocks/attn_norm", "D", ("embed",), "ones", 0, "", lambda cfg: True),
    ("blocks/q_proj", "DNH", ("embed", "heads", "head_dim"), "normal", 1, "D", lambda cfg: True),
    ("blocks/k_proj", "DKH", ("embed", "kv_heads", "head_dim"), "normal", 1, "D",
     lambda cfg: True),
    ("blocks/v_proj", "DKH", ("embed", "kv_heads", "head_dim"), "normal", 1, "D",
     lambda cfg: True),
    ("blocks/q_norm", "H", ("head_dim",), "ones", 0, "", lambda cfg: cfg.qk_norm),
    ("blocks/k_norm", "H", ("head_dim",), "ones", 0, "", lambda cfg: cfg.qk_norm),
    ("blocks/attn_out", "NHD", ("heads", "head_dim", "embed"), "normal", 2, "D",
     lambda cfg: True),
    ("blocks/ff_norm", "D", ("embed",), "ones", 0, "", lambda cfg: True),
)


def attention_params(layer, hf_names: dict[str, str], **per_path) -> tuple[ParamSpec, ...]:
  """The per-layer attention entries; `per_path[path]` adds keyword arguments to `layer`."""
  return tuple(layer(path, dims, axes, init, hf_names[path], lin, fan, "Y", present,
                     **per_path.get(path.split("/")[1], {}))
               for path, dims, axes, init, lin, fan, present in _ATTENTION_ROWS)


_EXPERT = ("experts", "embed", "mlp")
# The dense-MLP (stack Z) and MoE (stack M) entries: (path, dims, axes, init, linear_in_dims,
# fan_in, stack, present). Families differ only in the HF names (`ffn_params`).
_FFN_ROWS = (
    ("dense/ff_proj", "DF", ("embed", "mlp"), "normal", 1, "D", "Z", _has_dense),
    ("dense/up_proj", "DF", ("embed", "mlp"), "normal", 1, "D", "Z", _has_dense),
    ("dense/ff_out", "FD", ("mlp", "embed"), "normal", 1, "F", "Z", _has_dense),
    ("moe/router", "DE", ("embed", None), "normal", 1, "D", "M", _has_moe),
    ("moe/expert_bias", "E", (None,), "zeros", 0, "", "M",
     lambda cfg: _has_moe(cfg) and cfg.expert_bias),
    ("moe/gate_proj", "EDX", _EXPERT, "normal", 1, "D", "M", _has_moe),
    ("moe/up_proj", "EDX", _EXPERT, "normal", 1, "D", "M", _has_moe),
    ("moe/down_proj", "EXD", ("experts", "mlp", "embed"), "normal", 1, "X", "M", _has_moe),
    ("moe/shared_gate", "DS", ("embed", "mlp"), "normal", 1, "D", "M", _has_shared),
    ("moe/shared_up", "DS", ("embed", "mlp"), "normal", 1, "D", "M", _has_shared),
    ("moe/shared_down", "SD", ("mlp", "embed"), "normal", 1, "S", "M", _has_shared),
)


def ffn_params(layer, expert_bias: str, shared: str) -> tuple[ParamSpec, ...]:
  """The FFN entries of a MoE family's table; `layer` makes a per-layer ParamSpec.

  HF names (after `model.layers.{i}.`, {e} = expert) are those both MoE families
  share, but for the router's `expert_bias` and the `shared` expert's prefix.
  """
  hf_names = {"dense/ff_proj": "mlp.gate_proj.weight", "dense/up_proj": "mlp.up_proj.weight",
              "dense/ff_out": "mlp.down_proj.weight", "moe/router": "mlp.gate.weight",
              "moe/expert_bias": expert_bias,
              **{f"moe/{w}_proj": f"mlp.experts.{{e}}.{w}_proj.weight"
                 for w in ("gate", "up", "down")},
              **{f"moe/shared_{w}": f"{shared}.{w}_proj.weight" for w in ("gate", "up", "down")}}
  return tuple(layer(path, dims, axes, init, hf_names[path], lin, fan, stack, present)
               for path, dims, axes, init, lin, fan, stack, present in _FFN_ROWS)


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("wte", "VD", ("vocab", "embed"), "embed", "model.embed_tokens.weight"),
    *attention_params(_layer, {
        "blocks/attn_norm": "input_layernorm.weight", "blocks/q_proj": "self_attn.q_proj.weight",
        "blocks/k_proj": "self_attn.k_proj.weight", "blocks/v_proj": "self_attn.v_proj.weight",
        "blocks/q_norm": "self_attn.q_norm.weight", "blocks/k_norm": "self_attn.k_norm.weight",
        "blocks/attn_out": "self_attn.o_proj.weight",
        "blocks/ff_norm": "post_attention_layernorm.weight",
    }),
    *ffn_params(_layer, expert_bias="mlp.expert_bias", shared="shared_expert"),
    ParamSpec("ln_f", "D", ("embed",), "ones", "model.norm.weight"),
    ParamSpec("ff_out", "DV", ("embed", "vocab"), "normal", "lm_head.weight", 1, "D",
              present=lambda cfg: not cfg.weight_tying),
)


def layer_ids(cfg: ModelConfig) -> dict[str, list[int]]:
  """The model's layer indices of each stack: Y all, M the MoE layers, Z the dense ones."""
  return {"Y": list(range(cfg.n_layers)),
          "M": [i for i, m in enumerate(cfg.moe_layers) if m],
          "Z": [i for i, m in enumerate(cfg.moe_layers) if not m]}


def dim_sizes(cfg: ModelConfig) -> dict[str, int]:
  """Size of each dimension letter used in `PARAMS`."""
  ids = layer_ids(cfg)
  return {**llada.dim_sizes(cfg), "E": cfg.num_experts, "X": cfg.moe_hidden_size,
          "S": cfg.shared_expert_hidden_size, "M": len(ids["M"]), "Z": len(ids["Z"])}


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
  """The table entries this config has."""
  return params_lib.present_specs(PARAMS, cfg)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter, keyed by path (stacked ones with their layers axis first)."""
  return params_lib.shapes(param_specs(cfg), dim_sizes(cfg))


def moe_config(cfg: ModelConfig) -> moe_lib.MoEConfig:
  return moe_lib.MoEConfig(num_experts=cfg.num_experts, k=cfg.num_experts_per_tok,
                           router=cfg.router, n_group=cfg.n_group, topk_group=cfg.topk_group,
                           routed_scaling_factor=cfg.routed_scaling_factor, impl=cfg.moe_impl)


def moe_ffn(p: dict[str, jax.Array], n_BWD: jax.Array, cfg: ModelConfig,
            mask_BS: jax.Array | None):
  """Routed experts (+ the shared expert) on normed inputs -> ([B, W, D], aux losses).

  The losses weight real tokens only when the mask covers the W positions
  (full forwards; cached windows do not train).
  """
  mask_BS = key_mask(mask_BS)  # a block-causal mask's key padding
  mask_BW = mask_BS if mask_BS is not None and mask_BS.shape[1] == n_BWD.shape[1] else None
  weights = {k: p[k] for k in ("router", "expert_bias", "gate_proj", "up_proj", "down_proj")
             if k in p}
  mesh, rules = sharding.active_mesh()
  y_BWD, aux = moe_lib.moe_layer(n_BWD, weights, moe_config(cfg), mesh=mesh, rules=rules,
                                 mask=mask_BW)
  if "shared_gate" in p:
    y_BWD = y_BWD + swiglu(n_BWD, p["shared_gate"], p["shared_up"], p["shared_down"])
  return y_BWD, {"load_balancing_loss": aux.load_balancing_loss,
                 "router_z_loss": aux.router_z_loss}


class Transformer(llada.Transformer):
  """The LLaDA-MoE mask predictor: token ids [B, L] -> float32 logits [B, L, V]."""

  def segments(self):
    """Runs of consecutive MoE / dense layers, each scanned with its block function."""
    cfg = self.config
    attention = llada._stacked(self.blocks)  # pylint: disable=protected-access
    groups = {1: llada._stacked(self.moe) if _has_moe(cfg) else {},  # pylint: disable=protected-access
              0: llada._stacked(self.dense) if _has_dense(cfg) else {}}  # pylint: disable=protected-access
    ffns = {1: moe_ffn, 0: llada.dense_ffn}
    out, first, seen = [], 0, {0: 0, 1: 0}
    for kind, run in itertools.groupby(cfg.moe_layers):
      n = len(list(run))
      a, b = seen[kind], seen[kind] + n
      weights = {**{k: v[first:first + n] for k, v in attention.items()},
                 **{k: v[a:b] for k, v in groups[kind].items()}}
      out.append((functools.partial(llada.block_forward, ffn=ffns[kind]), weights, first, n))
      first, seen[kind] = first + n, b
    return out


# ------------------------------------------------------------ config.json mapping

# Keys whose value must be this for the model here to compute what the release does.
_HF_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "clip_qkv": None,
                "rope_scaling": None, "mlp_bias": False}
# Keys the released forward reads but does not use: a non-default value only warns.
_HF_IGNORED = {"norm_topk_prob": False, "moe_router_score_function": "softmax",
               "routed_scaling_factor": 1, "router_num_group": None, "router_topk_group": None}
# HF key -> ModelConfig field, for the keys both MoE releases (this one, LLaDA2) name alike.
HF_FIELDS_SHARED = {
    "hidden_size": "d_model", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "num_hidden_layers": "n_layers",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_sequence_length",
    "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "weight_tying", "partial_rotary_factor": "partial_rotary_factor",
    "num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "mask_token_id": "mask_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
}
_HF_FIELDS = {  # HF key -> ModelConfig field
    **HF_FIELDS_SHARED,
    "dense_intermediate_size": "mlp_hidden_size", "qk_layernorm": "qk_norm",
    "expert_intermediate_size": "moe_hidden_size",
    "shared_expert_intermediate_size": "shared_expert_hidden_size",
    "moe_router_enable_expert_bias": "expert_bias",
}


def _moe_layers(freq: Any, n_layers: int) -> tuple[int, ...]:
  if isinstance(freq, int) and not isinstance(freq, bool):
    if freq != 1:
      raise ValueError(f"config.json: moe_layer_freq={freq} (an int other than 1) is not "
                       "supported by llada_jax; give the per-layer list")
    return (1,) * n_layers
  if not isinstance(freq, (list, tuple)) or len(freq) != n_layers or any(
      v not in (0, 1) for v in freq):
    raise ValueError(f"config.json: moe_layer_freq must be 1 or a list of {n_layers} "
                     f"0/1 entries (num_hidden_layers), got {freq!r}")
  return tuple(int(v) for v in freq)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> dict[str, Any]:
  """ModelConfig fields of a LLaDA-MoE `config.json` (+ `overrides`, which win);
  refuses what is not implemented."""
  for key, want in _HF_REQUIRED.items():
    if hf.get(key, want) not in (want,) and not (want is False and hf.get(key) is None):
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported by llada_jax's "
                       f"LLaDA-MoE (only {want!r})")
  for key, default in _HF_IGNORED.items():
    if hf.get(key, default) != default:
      logging.warning("config.json: %s=%r is read but not used by the released LLaDA-MoE "
                      "forward; ignored (as the release does)", key, hf[key])
  missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                         "vocab_size", "num_experts", "num_experts_per_tok",
                         "expert_intermediate_size") if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json: missing required key(s) {', '.join(missing)}")
  if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
    raise ValueError(f"config.json: head_dim={hf['head_dim']} differs from hidden_size / "
                     "num_attention_heads, which llada_jax's LLaDA-MoE requires")
  values: dict[str, Any] = {"family": "llada_moe"}
  for key, field in _HF_FIELDS.items():
    if hf.get(key) is not None:
      values[field] = hf[key]
  values["moe_layers"] = _moe_layers(hf.get("moe_layer_freq", 1), hf["num_hidden_layers"])
  values.setdefault("n_kv_heads", hf["num_attention_heads"])
  values.setdefault("mlp_hidden_size", 4 * hf["hidden_size"])
  values["embedding_size"] = hf["vocab_size"]
  values.setdefault("shared_expert_hidden_size", 0)
  values["eot_token_id"] = hf.get("eot_token_id")
  values.setdefault("bos_token_id", None)
  if "pad_token_id" not in values and "eos_token_id" in values:
    values["pad_token_id"] = values["eos_token_id"]
  values.update(overrides)
  return ling_special_ids(values, hf["vocab_size"])


def ling_special_ids(values: dict[str, Any], vocab_size: int) -> dict[str, Any]:
  """`values` with the mask id defaulted to the Ling tokenizer's (only for its
  vocabulary; the released config.json files have none); EOS and pad required."""
  if "mask_token_id" not in values:
    if vocab_size != LING_VOCAB_SIZE:
      raise ValueError("config.json: mask_token_id is missing (not in config.json or the "
                       "tokenizer files) and the vocabulary is not the Ling tokenizer's, so "
                       "it has no default; pass load(..., mask_token_id=...)")
    values["mask_token_id"] = LING_MASK_TOKEN_ID
  for key in ("eos_token_id", "pad_token_id"):
    if key not in values:
      raise ValueError(f"config.json: {key} is missing")
  return values


def remote_code_keys(model_type: str, module: str, config_class: str, model_class: str,
                     lm_class: str) -> dict[str, Any]:
  """The config.json keys naming a trust_remote_code release's classes (in
  `configuration_{module}.py` / `modeling_{module}.py`) and its model_type."""
  return {"architectures": [lm_class], "model_type": model_type,
          "auto_map": {"AutoConfig": f"configuration_{module}.{config_class}",
                       "AutoModel": f"modeling_{module}.{model_class}",
                       "AutoModelForCausalLM": f"modeling_{module}.{lm_class}"}}


def config_to_hf(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
  """The HF `config.json` dict of a LLaDA-MoE config (the release's keys)."""
  hf: dict[str, Any] = {
      **remote_code_keys("llada", "lladamoe", "LLaDAConfig", "LLaDAMoEModelLM", "LLaDAMoEModelLM"),
      "hidden_act": "silu", "attention_bias": False,
      "attention_dropout": 0.0, "clip_qkv": None, "rope_scaling": None, "use_cache": False,
      "initializer_range": 0.02, "output_router_logits": False,
      "moe_layer_freq": list(cfg.moe_layers), "moe_router_score_function": "softmax",
      "norm_topk_prob": False, "routed_scaling_factor": 1, "router_num_group": None,
      "router_topk_group": None, "torch_dtype": torch_dtype or cfg.param_dtype,
  }
  for key, field in _HF_FIELDS.items():
    hf[key] = getattr(cfg, field)
  if not cfg.shared_expert_hidden_size:
    hf["shared_expert_intermediate_size"] = None
  return dict(sorted(hf.items()))
