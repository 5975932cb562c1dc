"""Read a llama.cpp GGUF file as a transformers-style config dict and float32 HF-named tensors.

The model code only knows transformers' names and layouts; this module converts:
  * names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, etc.;
  * layout: GGUF lists dims innermost-first, so a tensor of GGUF shape [in, out] is the numpy array
    [out, in] — already transformers' [out_features, in_features];
  * RoPE: llama.cpp's convert_hf_to_gguf permutes Q/K rows of Llama models for its interleaved
    (GPT-J style) rotary embedding; transformers rotates halves, so the permutation is undone here.
  * quantisation: every tensor is dequantised to float32 with `gguf.quants.dequantize`.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterator

import numpy as np

from first_jax.runtime.errors import UserError

_log = logging.getLogger(__name__)

# llama.cpp tensor suffix -> transformers module path (inside `model.layers.N.`).
_BLOCK_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Architectures whose converter permutes Q/K rows (LlamaModel.permute in convert_hf_to_gguf.py).
_PERMUTED_ARCHS = {"llama"}
_HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# Tensors llama.cpp adds that transformers computes itself.
_SKIPPED = {"rope_freqs.weight"}


def _open(path: str | os.PathLike):
  import gguf  # imported lazily: only GGUF users pay for it

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"{path}: GGUF file not found")
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # gguf raises ValueError/struct errors on foreign files
    raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _value(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _where(reader) -> str:
  return str(getattr(reader.data, "filename", "GGUF file"))  # np.memmap keeps its path


def _require(reader, key: str) -> Any:
  value = _value(reader, key)
  if value is None:
    raise UserError(f"{_where(reader)}: GGUF metadata key {key!r} is missing")
  return value


def hf_name(gguf_name: str) -> str | None:
  """transformers' name for a llama.cpp tensor name; None for names we do not convert."""
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's GGUF interleaved Q/K rows back to transformers' rotate-half order (the inverse
  of llama.cpp's convert script's permutation)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(reader, tensor_names: set[str]) -> dict[str, Any]:
  arch = _require(reader, "general.architecture")
  if arch not in _HF_ARCH:
    raise UserError(
      f"{_where(reader)}: GGUF architecture {arch!r} is not supported "
      f"(expected one of {sorted(_HF_ARCH)})")
  model_type, hf_class = _HF_ARCH[arch]
  tokens = _value(reader, "tokenizer.ggml.tokens")
  vocab_size = _value(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
  if vocab_size is None:
    raise UserError(f"{_where(reader)}: GGUF has neither {arch}.vocab_size nor a token list")
  hidden = int(_require(reader, f"{arch}.embedding_length"))
  n_heads = int(_require(reader, f"{arch}.attention.head_count"))
  n_kv = int(_value(reader, f"{arch}.attention.head_count_kv", n_heads))
  head_dim = int(_value(reader, f"{arch}.attention.key_length", hidden // n_heads))
  rope_theta = float(_value(reader, f"{arch}.rope.freq_base", 10000.0))
  if _value(reader, f"{arch}.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in tensor_names:
    _log.warning("%s: GGUF RoPE scaling is not converted; positions beyond the original context "
                 "will differ from the source model", _where(reader))
  cfg = {
    "model_type": model_type,
    "architectures": [hf_class],
    "vocab_size": int(vocab_size),
    "hidden_size": hidden,
    "intermediate_size": int(_require(reader, f"{arch}.feed_forward_length")),
    "num_hidden_layers": int(_require(reader, f"{arch}.block_count")),
    "num_attention_heads": n_heads,
    "num_key_value_heads": n_kv,
    "head_dim": head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": float(_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
    # transformers 5 reads rope_parameters; older readers and config.json files use rope_theta.
    "rope_theta": rope_theta,
    "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
    "max_position_embeddings": int(_value(reader, f"{arch}.context_length", 2048)),
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "attention_bias": "blk.0.attn_q.bias" in tensor_names,
    "mlp_bias": False,
  }
  for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
    value = _value(reader, f"tokenizer.ggml.{gguf_key}")
    if value is not None:
      cfg[key] = int(value)
  return cfg


def _tensors(reader, cfg: dict[str, Any], arch: str) -> Iterator[tuple[str, np.ndarray]]:
  from gguf.quants import dequantize

  n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None:
      if t.name not in _SKIPPED:
        _log.warning("%s: skipping unknown GGUF tensor %s", _where(reader), t.name)
      continue
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost-first
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    if arch in _PERMUTED_ARCHS and (".q_proj." in name or ".k_proj." in name):
      w = unpermute_qk(w, n_heads if ".q_proj." in name else n_kv)
    if not w.flags.writeable:  # F32 tensors are views of the read-only memory map
      w = w.copy()
    yield name, w


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
  """Returns (transformers config dict, lazy iterator of (hf_name, float32 array [out, in]))."""
  reader = _open(path)
  names = {t.name for t in reader.tensors}
  cfg = _config(reader, names)
  arch = _require(reader, "general.architecture")
  return cfg, _tensors(reader, cfg, arch)


def gguf_tokenizer_data(path: str | os.PathLike) -> dict[str, Any]:
  """The tokenizer stored in a GGUF: model, pre, tokens, token_types, merges, special ids, template."""
  reader = _open(path)
  tokens = _value(reader, "tokenizer.ggml.tokens")
  if not tokens:
    raise UserError(f"{path}: GGUF holds no tokenizer (tokenizer.ggml.tokens is missing)")
  data = {
    "model": _value(reader, "tokenizer.ggml.model", "gpt2"),
    "pre": _value(reader, "tokenizer.ggml.pre", "default"),
    "tokens": list(tokens),
    "token_types": list(_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))),
    "merges": list(_value(reader, "tokenizer.ggml.merges", [])),
    "add_bos": bool(_value(reader, "tokenizer.ggml.add_bos_token", False)),
    "chat_template": _value(reader, "tokenizer.chat_template"),
  }
  for key in ("bos", "eos", "unknown", "padding"):
    value = _value(reader, f"tokenizer.ggml.{key}_token_id")
    data[f"{key}_token_id"] = None if value is None else int(value)
  return data
