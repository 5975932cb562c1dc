"""`ModelConfig`: Llama-family decoder hyper-parameters, validated, with HF config.json I/O."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from first_jax.runtime.errors import UserError

MODEL_TYPES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a Llama / Qwen2 / Mistral decoder (validated on construction).

  `rope_scaling` is None or a Llama-3 / linear scaling dict; it is stored as a sorted tuple of
  (key, value) pairs so the config stays hashable (`rope_scaling_dict()` gives it back).
  `attention_bias` (q/k/v bias) follows the model type when left None: transformers' Qwen2 always
  has it, Llama's flag would also add an o_proj bias and Mistral has none.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  model_type: str = "llama"
  head_dim: int | None = None  # None: hidden_size // num_heads.
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool | None = None  # None: True for qwen2, else False.
  max_position_embeddings: int = 2048
  sliding_window: int | None = None  # Mistral-style local attention; None: full causal.
  dtype: str = "float32"  # Compute dtype.
  param_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True
  # Fields filled in from others (head_dim, attention_bias); `replace` derives them afresh.
  _derived: tuple = dataclasses.field(default=(), init=False, compare=False, repr=False)

  def __post_init__(self):
    derived = []
    if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_heads):
      if self.num_heads > 0 and self.hidden_size % self.num_heads == 0:
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        derived.append("head_dim")
    if self.attention_bias is None:
      object.__setattr__(self, "attention_bias", self.model_type == "qwen2")
      derived.append("attention_bias")
    object.__setattr__(self, "_derived", tuple(derived))
    if isinstance(self.rope_scaling, Mapping):  # rope_theta lives in its own field.
      items = sorted((k, v) for k, v in self.rope_scaling.items() if k != "rope_theta")
      object.__setattr__(self, "rope_scaling", tuple(items))
    self.validate()

  def validate(self, prefix: str = "model") -> None:
    """Raises UserError("<prefix>.<field>: <expected>") on the first bad field."""
    def bad(name: str, expected: str) -> UserError:
      return UserError(f"{prefix}.{name}: {expected}, got {getattr(self, name)!r}")

    if self.model_type not in MODEL_TYPES:
      raise bad("model_type", f"must be one of {', '.join(MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
        raise bad(name, "must be a positive integer")
    if self.head_dim is None:
      raise bad("head_dim", f"must be given when num_heads ({self.num_heads}) does not divide "
                f"hidden_size ({self.hidden_size})")
    if not _is_int(self.head_dim) or self.head_dim <= 0 or self.head_dim % 2:
      raise bad("head_dim", "must be a positive even integer (RoPE rotates pairs)")
    if self.num_heads % self.num_kv_heads:
      raise bad("num_kv_heads", f"must divide num_heads ({self.num_heads})")
    for name in ("rope_theta", "rms_norm_eps"):
      if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
        raise bad(name, "must be a positive number")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise bad(name, f"must be one of {', '.join(DTYPES)}")
    for name in ("tie_word_embeddings", "remat", "scan_layers", "attention_bias"):
      if not isinstance(getattr(self, name), bool):
        raise bad(name, "must be true or false")
    if self.attention_bias != (self.model_type == "qwen2"):
      raise bad("attention_bias", f"must be {self.model_type == 'qwen2'} for model_type "
                f"{self.model_type} (q/k/v bias exists exactly in qwen2)")
    if self.sliding_window is not None and (self.model_type != "mistral"
                                            or not _is_int(self.sliding_window)
                                            or self.sliding_window <= 0):
      raise bad("sliding_window", "must be null, or a positive integer for mistral")
    scaling = self.rope_scaling_dict()
    if scaling is not None:
      kind = scaling.get("rope_type", scaling.get("type"))
      need = {"llama3": _LLAMA3_KEYS, "linear": ("factor",)}.get(kind)
      if need is None:
        raise bad("rope_scaling", "rope_type must be llama3, linear or default")
      missing = [k for k in need if not isinstance(scaling.get(k), (int, float))]
      if missing:
        raise bad("rope_scaling", f"{kind} scaling needs numbers {', '.join(missing)}")

  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def architecture(self) -> str:
    return _ARCHITECTURES[self.model_type]

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with `changes`; derived fields not named are derived again (e.g. head_dim)."""
    return dataclasses.replace(self, **{**{k: None for k in self._derived}, **changes})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], prefix: str = "model") -> "ModelConfig":
    """Builds from our own field names; unknown keys are a UserError naming them."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise UserError(f"{prefix}.{unknown[0]}: unknown field (known: {', '.join(sorted(fields))})")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.init and f.default is dataclasses.MISSING and f.name not in d]
    if missing:
      raise UserError(f"{prefix}.{missing[0]}: required field is missing")
    try:
      return cls(**d)
    except UserError as e:
      if prefix == "model":
        raise
      raise UserError(str(e).replace("model.", prefix + ".", 1)) from None

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
    d["rope_scaling"] = self.rope_scaling_dict()
    return d

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json",
              **overrides: Any) -> "ModelConfig":
    """Builds from a transformers config.json dict (v4 or v5 rope keys); `overrides` win."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise UserError(f"{source}: model_type must be one of {', '.join(MODEL_TYPES)}, "
                      f"got {model_type!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in hf:
        raise UserError(f"{source}: {key} is missing")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
      raise UserError(f"{source}: hidden_act must be silu, got {hf.get('hidden_act')!r}")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
      raise UserError(f"{source}: attention_bias/mlp_bias must be false for llama "
                      "(o_proj and MLP biases are not supported)")
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    if rope.get("rope_type", rope.get("type")) in (None, "default"):
      rope = {}
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
      raise UserError(f"{source}: use_sliding_window must be false for qwen2 (not supported)")
    kwargs = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=rope or None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        sliding_window=window,
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except UserError as e:
      raise UserError(f"{source}: {e}") from None

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """The transformers config.json dict (both v4 and v5 rope keys, so either version loads it)."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = dict(self.rope_scaling_dict(), rope_theta=self.rope_theta)
    hf = {
        "architectures": [self.architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": self.rope_scaling_dict(),
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "dtype": dtype or self.param_dtype,
        "torch_dtype": dtype or self.param_dtype,
    }
    if self.model_type == "llama":
      hf.update(attention_bias=False, mlp_bias=False)
    if self.model_type == "mistral":
      hf["sliding_window"] = self.sliding_window
    if self.model_type == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)
