"""The LLaDA model configuration and its HuggingFace `config.json` form.

`ModelConfig` is a frozen (hashable) dataclass so it can be a static argument
of `jax.jit`. It is built from an ml_collections `ConfigDict` (the files in
`configs/`), from an HF `config.json`, and written back to the HF format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping

from llada_jax import paths

# LLaDA's own 126,464-token vocabulary: its default ids (SPEC §2; the released config.json
# lacks BOS and EoT). Used only when the vocabulary is that one.
LLADA_VOCAB_SIZE = 126464
LLADA_DEFAULT_IDS = {
    "bos_token_id": 126080,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "mask_token_id": 126336,
    "eot_token_id": 126348,
}
# Special-token strings, for finding ids in a tokenizer's files.
SPECIAL_TOKENS = {
    "bos_token_id": "<|startoftext|>",
    "eos_token_id": "<|endoftext|>",
    "mask_token_id": "<|mdm_mask|>",
    "eot_token_id": "<|eot_id|>",
    "start_header_token_id": "<|start_header_id|>",
    "end_header_token_id": "<|end_header_id|>",
}

FAMILIES = ("llada", "llada_moe", "llada2")  # llada_jax/models/<family>.py
MOE_FAMILIES = ("llada_moe", "llada2")

# HF keys whose value must be exactly this for the model here to be the same
# model; anything else is a feature we do not implement.
_HF_REQUIRED = {
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "bias_for_layer_norm": False,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "attention_layer_norm": False,
    "rope": True,
    "rope_full_precision": True,
    "activation_type": "silu",
    "input_emb_norm": False,
    "block_group_size": 1,
    "clip_qkv": None,
    "multi_query_attention": None,
}
# HF keys we read into ModelConfig fields (HF name -> field name).
_HF_FIELDS = {
    "d_model": "d_model",
    "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads",
    "n_layers": "n_layers",
    "mlp_hidden_size": "mlp_hidden_size",
    "vocab_size": "vocab_size",
    "embedding_size": "embedding_size",
    "max_sequence_length": "max_sequence_length",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "weight_tying": "weight_tying",
    "scale_logits": "scale_logits",
    "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eot_token_id": "eot_token_id",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape, numerics and special ids of a LLaDA Transformer.

  Sizes are counts; `dtype` is the compute dtype and `param_dtype` the storage
  dtype of the parameters ("float32" | "bfloat16").
  """

  d_model: int = 4096
  n_heads: int = 32
  n_kv_heads: int = 32
  n_layers: int = 32
  mlp_hidden_size: int = 12288
  vocab_size: int = LLADA_VOCAB_SIZE
  embedding_size: int = LLADA_VOCAB_SIZE
  max_sequence_length: int = 4096
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  weight_tying: bool = False
  scale_logits: bool = False
  mask_token_id: int = 126336
  eos_token_id: int = 126081
  pad_token_id: int = 126081
  bos_token_id: int | None = 126080
  eot_token_id: int | None = 126348
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "xla"  # "xla" | "splash" (TPU Pallas kernel)
  remat_policy: str = "none"  # see model.REMAT_POLICIES
  scan_layers: bool = True
  # Model family (llada_jax/models/<family>.py) and the settings only some families use.
  family: str = "llada"  # "llada" (dense LLaDA-8B) | "llada_moe" (LLaDA-MoE) | "llada2" (LLaDA2.x)
  explicit_head_dim: int | None = None  # head size when not d_model // n_heads (config.json head_dim)
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE
  partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim * f) dims
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_hidden_size: int = 0  # each expert's SwiGLU hidden size
  shared_expert_hidden_size: int = 0  # 0: no shared expert
  moe_layers: tuple[int, ...] = ()  # per layer: 1 = MoE, 0 = dense (mlp_hidden_size)
  expert_bias: bool = False  # router bias added to the probabilities (LLaDA-MoE)
  router_aux_loss_coef: float = 0.0  # load-balancing loss weight (training)
  router_z_loss_coef: float = 0.0  # router z-loss weight (training)
  moe_impl: str = "auto"  # expert dispatch: see layers/moe.py IMPLS
  router: str = "softmax_biased"  # layers/moe.py ROUTERS: "softmax_biased" | "sigmoid_grouped"
  n_group: int = 1  # sigmoid_grouped: expert groups; top-k only within the topk_group best
  topk_group: int = 1
  routed_scaling_factor: float = 1.0  # sigmoid_grouped: combine weights x this

  def __post_init__(self):
    if isinstance(self.moe_layers, list):
      object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
    _check_types(self)
    _check(self.explicit_head_dim is not None or self.d_model % self.n_heads == 0, "d_model",
           f"{self.d_model} is not a multiple of n_heads={self.n_heads}")
    _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
           f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    _check(self.head_dim % 2 == 0, "d_model", "head_dim must be even for rotary embeddings")
    _check(self.embedding_size >= self.vocab_size, "embedding_size",
           f"{self.embedding_size} is smaller than vocab_size={self.vocab_size}")
    for name in ("dtype", "param_dtype"):
      _check(getattr(self, name) in ("float32", "bfloat16"), name,
             f"{getattr(self, name)!r} is not 'float32' or 'bfloat16'")
    _check(self.family in FAMILIES, "family", f"{self.family!r} is not one of {FAMILIES}")
    if self.family in MOE_FAMILIES:
      _check(self.num_experts > 0 and 1 <= self.num_experts_per_tok <= self.num_experts,
             "num_experts_per_tok", f"{self.num_experts_per_tok} is not in [1, num_experts="
             f"{self.num_experts}]")
      _check(len(self.moe_layers) == self.n_layers, "moe_layers",
             f"has {len(self.moe_layers)} entries for n_layers={self.n_layers}")
    _check(self.attention in ("xla", "splash"), "attention",
           f"{self.attention!r} is not 'xla' or 'splash'")
    for name in ("mask_token_id", "eos_token_id", "pad_token_id",
                 "bos_token_id", "eot_token_id"):
      value = getattr(self, name)
      _check(value is None or 0 <= value < self.embedding_size, name,
             f"{value} is outside [0, embedding_size={self.embedding_size})")

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.d_model // self.n_heads

  @property
  def rotary_dim(self) -> int:
    """Dims of each head RoPE rotates (the first ones)."""
    return int(self.head_dim * self.partial_rotary_factor)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def _ffn_params(self, active: bool) -> int:
    """FFN weights of all layers (MoE layers: all experts, or the k active ones)."""
    d = self.d_model
    if self.family not in MOE_FAMILIES:
      return self.n_layers * 3 * d * self.mlp_hidden_size
    n_moe = sum(self.moe_layers)
    experts = self.num_experts_per_tok if active else self.num_experts
    per_moe = (experts * 3 * d * self.moe_hidden_size + d * self.num_experts
               + 3 * d * self.shared_expert_hidden_size + self.num_experts * self.expert_bias)
    return n_moe * per_moe + (self.n_layers - n_moe) * 3 * d * self.mlp_hidden_size

  def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
    """Parameter count (the 8B config gives 8,015,581,184); `active`: MoE counts only
    the experts each token runs (k of E)."""
    d, hd = self.d_model, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * d
    attn += 2 * hd if self.qk_norm else 0
    embed = self.embedding_size * d * (1 if self.weight_tying else 2)
    return (self.n_layers * attn + self._ffn_params(active) + d
            + (embed if include_embedding else 0))

  def forward_flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token: 2 per weight multiply-add of the
    weights a token uses (MoE: its k experts; embedding lookup excluded) plus full
    non-causal attention, 4·L·D per layer."""
    d, hd = self.d_model, self.head_dim
    matmul_params = self.n_layers * d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    matmul_params += self._ffn_params(active=True) - (
        sum(self.moe_layers) * self.num_experts * self.expert_bias)
    matmul_params += self.embedding_size * d  # the output head
    return 2.0 * matmul_params + 4.0 * self.n_layers * seq_len * d

  # ---- conversions ------------------------------------------------------

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """From a plain mapping or an ml_collections ConfigDict; unknown keys fail."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From the dict of an HF LLaDA `config.json`; refuses other models.

    Ids the file lacks are filled with LLaDA's defaults only for LLaDA's own
    vocabulary (see `resolve_special_ids` for the tokenizer step in between).
    """
    if hf.get("model_type") == "llada2_moe":  # LLaDA2.x (block diffusion)
      from llada_jax.models import llada2  # pylint: disable=g-import-not-at-top
      return cls.from_dict(llada2.config_from_hf(hf, **overrides))
    if hf.get("model_type") != "llada":
      raise ValueError(
          f"config.json: model_type is {hf.get('model_type')!r}, expected 'llada'")
    if "num_experts" in hf or "hidden_size" in hf:  # LLaDA-MoE: same model_type, other keys
      from llada_jax.models import llada_moe  # pylint: disable=g-import-not-at-top
      return cls.from_dict(llada_moe.config_from_hf(hf, **overrides))
    for key, want in _HF_REQUIRED.items():
      if key in hf and hf[key] != want and not (want is None and hf[key] is False):
        raise ValueError(
            f"config.json: {key}={hf[key]!r} is not supported by llada_jax "
            f"(only {want!r})")
    missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if k not in hf]
    if missing:
      raise ValueError(f"config.json: missing required key(s) {', '.join(missing)}")
    values: dict[str, Any] = {}
    for hf_key, field in _HF_FIELDS.items():
      if hf.get(hf_key) is not None:
        values[field] = hf[hf_key]
    values.setdefault("n_kv_heads", hf["n_heads"])
    values.setdefault("embedding_size", hf["vocab_size"])
    if "mlp_hidden_size" not in values:
      ratio = hf.get("mlp_ratio", 4)
      if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 1:
        raise ValueError(f"config.json: mlp_ratio: expected a positive integer, got "
                         f"{_short(ratio)}")
      if isinstance(hf["d_model"], int):  # else the d_model check names it
        values["mlp_hidden_size"] = ratio * hf["d_model"]
    if "pad_token_id" not in values and "eos_token_id" in values:
      values["pad_token_id"] = values["eos_token_id"]
    llada_vocab = values.get("embedding_size") == LLADA_VOCAB_SIZE
    for key, default in LLADA_DEFAULT_IDS.items():
      if key not in values:
        if llada_vocab:
          values[key] = default
        elif key in ("bos_token_id", "eot_token_id"):
          values[key] = None
        else:
          raise ValueError(f"config.json: {key} is missing and the vocabulary "
                           f"is not LLaDA's own, so it has no default")
    values.update(overrides)
    try:
      return cls.from_dict(values)
    except ValueError as e:  # name the file's key, not the dataclass field
      field = str(e).removeprefix("ModelConfig.").split(":")[0]
      if field in overrides:
        raise
      raise ValueError("config.json: " + str(e).removeprefix("ModelConfig.")) from e

  def to_hf(self, torch_dtype: str | None = None) -> dict[str, Any]:
    """The HF `config.json` dict, with the keys of the released checkpoint."""
    if self.family == "llada_moe":
      from llada_jax.models import llada_moe  # pylint: disable=g-import-not-at-top
      return llada_moe.config_to_hf(self, torch_dtype)
    if self.family == "llada2":
      from llada_jax.models import llada2  # pylint: disable=g-import-not-at-top
      return llada2.config_to_hf(self, torch_dtype)
    hf: dict[str, Any] = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "embedding_dropout": 0.0,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rope": True,
        "rope_full_precision": True,
        "torch_dtype": torch_dtype or self.param_dtype,
        "transformers_version": "4.46.2",
        "use_cache": False,
    }
    for hf_key, field in _HF_FIELDS.items():
      value = getattr(self, field)
      if value is not None:
        hf[hf_key] = value
    return dict(sorted(hf.items()))


def _check(ok: bool, name: str, why: str) -> None:
  if not ok:
    raise ValueError(f"ModelConfig.{name}: {why}")


_POSITIVE_INTS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                  "vocab_size", "embedding_size", "max_sequence_length")
_IDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _check_types(cfg: "ModelConfig") -> None:
  """Types and ranges of every field, before any arithmetic on them."""
  is_int = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
  for name in _POSITIVE_INTS:
    value = getattr(cfg, name)
    _check(is_int(value) and value > 0, name, f"expected a positive integer, got {_short(value)}")
  for name in ("rope_theta", "rms_norm_eps"):
    value = getattr(cfg, name)
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool)
           and math.isfinite(value) and value > 0, name,
           f"expected a finite number > 0, got {_short(value)}")
  for name in ("weight_tying", "scale_logits", "scan_layers"):
    _check(isinstance(getattr(cfg, name), bool), name,
           f"expected true or false, got {_short(getattr(cfg, name))}")
  for name in _IDS:
    value = getattr(cfg, name)
    optional = name in ("bos_token_id", "eot_token_id")
    _check(is_int(value) or (optional and value is None), name,
           f"expected a token id (integer), got {_short(value)}")
  for name in ("dtype", "param_dtype", "attention", "remat_policy"):
    _check(isinstance(getattr(cfg, name), str), name,
           f"expected a string, got {_short(getattr(cfg, name))}")


def read_hf_config(model_dir: str) -> dict[str, Any]:
  """The JSON object of `model_dir/config.json` (ValueError naming the file if it is not one)."""
  path = os.path.join(model_dir, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: no config.json in the model directory")
  with paths.open(path, encoding="utf-8") as f:
    try:
      hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: expected a JSON object, got a {type(hf).__name__}")
  return hf


def tokenizer_special_ids(model_dir: str) -> dict[str, int]:
  """Special-token ids found in `tokenizer.json` / `tokenizer_config.json`."""
  by_content: dict[str, int] = {}
  tok_json = os.path.join(model_dir, "tokenizer.json")
  if paths.exists(tok_json):
    with paths.open(tok_json, encoding="utf-8") as f:
      for tok in json.load(f).get("added_tokens", []):
        by_content[tok["content"]] = tok["id"]
  tok_cfg, named = os.path.join(model_dir, "tokenizer_config.json"), {}
  if paths.exists(tok_cfg):
    with paths.open(tok_cfg, encoding="utf-8") as f:
      tok_config = json.load(f)
    for tid, tok in tok_config.get("added_tokens_decoder", {}).items():
      by_content.setdefault(tok["content"], int(tid))
    for field in ("bos_token_id", "eos_token_id", "mask_token_id"):  # e.g. "mask_token": "<|mask|>"
      text = tok_config.get(field.removesuffix("_id"))
      named[field] = text.get("content") if isinstance(text, dict) else text
  found = {field: by_content[text] for field, text in SPECIAL_TOKENS.items()
           if text in by_content}
  for field, text in named.items():  # other vocabularies (Ling: LLaDA-MoE, LLaDA2)
    if field not in found and text in by_content:
      found[field] = by_content[text]
  return found


def config_from_model_dir(model_dir: str, **overrides) -> ModelConfig:
  """ModelConfig of a directory with an HF `config.json` (+ tokenizer files).

  Special ids: config.json first, then the tokenizer files, then SPEC §2's
  defaults for LLaDA's own vocabulary.
  """
  hf = read_hf_config(model_dir)
  from_tokenizer = tokenizer_special_ids(model_dir)
  for key in ("bos_token_id", "eos_token_id", "mask_token_id", "eot_token_id"):
    if hf.get(key) is None and key in from_tokenizer:
      hf = {**hf, key: from_tokenizer[key]}
  return ModelConfig.from_hf(hf, **overrides)
