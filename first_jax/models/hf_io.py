"""Hugging Face safetensors (and GGUF, via gguf_io) <-> Decoder params, streamed tensor by tensor.

Everything goes through transformers' tensor names and layouts ([out, in] weights): a source is
an iterator of (hf_name, np.ndarray). Each tensor is transposed / reshaped to the Flax kernel
layout and placed at once with its sharding; for scanned params the per-layer tensors of ONE
name are collected, stacked and placed, so host memory holds about one parameter at a time
(safetensors are read grouped by name; a GGUF stream in another order is buffered).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from first_jax.runtime.errors import UserError
from first_jax.runtime.io_util import atomic_path, atomic_write_json
from first_jax.runtime.sharding import DEFAULT_RULES, param_shardings, put_global, Rules, unbox
from first_jax.models.config import DTYPES, ModelConfig
from first_jax.models.llama import abstract_params, Decoder

# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor: our param path (inside a layer if `layer` is set), and whether the HF
  [out, in] matrix is transposed into a kernel whose first `n_in` axes are the input."""
  path: tuple[str, ...]
  layer: int | None
  transpose: bool
  n_in: int = 1


_LAYER_TENSORS = (
    ("input_layernorm.weight", ("attn_norm", "scale"), False),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), True),
    ("self_attn.q_proj.bias", ("attn", "q_proj", "bias"), False),
    ("self_attn.k_proj.bias", ("attn", "k_proj", "bias"), False),
    ("self_attn.v_proj.bias", ("attn", "v_proj", "bias"), False),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), True),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
)


def tensor_specs(config: ModelConfig) -> dict[str, _Spec]:
  """Every HF tensor name this config's model has, in a stable order."""
  specs = {"model.embed_tokens.weight": _Spec(("embed",), None, False),
           "model.norm.weight": _Spec(("final_norm", "scale"), None, False)}
  if not config.tie_word_embeddings:
    specs["lm_head.weight"] = _Spec(("lm_head",), None, True)
  for i in range(config.num_layers):
    for name, path, transpose in _LAYER_TENSORS:
      if path[-1] == "bias" and not config.attention_bias:
        continue
      n_in = 2 if path[1] == "o_proj" else 1  # o_proj contracts (heads, head_dim).
      specs[f"model.layers.{i}.{name}"] = _Spec(path, i, transpose, n_in)
  return specs


def _param_path(config: ModelConfig, spec: _Spec) -> tuple[str, ...]:
  if spec.layer is None:
    return spec.path
  return (("layers",) if config.scan_layers else (f"layers_{spec.layer}",)) + spec.path


def _hf_shape(spec: _Spec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The transformers shape of a tensor whose (per-layer) Flax shape is `shape`."""
  if spec.transpose:
    return (math.prod(shape[spec.n_in:]), math.prod(shape[:spec.n_in]))
  return (math.prod(shape),) if spec.path[-1] == "bias" else tuple(shape)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    return {p: v for k, sub in tree.items() for p, v in _flatten(sub, prefix + (k,)).items()}
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def hf_to_params(config: ModelConfig, named_tensors: Iterable[tuple[str, np.ndarray]],
                 shardings: Any = None, source: str = "checkpoint") -> dict[str, Any]:
  """Plain params from (hf_name, array) pairs, each placed with `shardings` (a plain tree of
  NamedShardings) when given, else on the default device."""
  specs = tensor_specs(config)
  shapes = _flatten(unbox(abstract_params(config)))
  flat_shardings = _flatten(shardings) if shardings is not None else {}
  dtype = jnp.dtype(config.param_dtype)
  out: dict[tuple[str, ...], jax.Array] = {}
  pending: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  seen: set[str] = set()

  def place(path, array):
    s = flat_shardings.get(path)
    out[path] = jax.device_put(array) if s is None else put_global(array, s)

  for name, w in named_tensors:
    spec = specs.get(name)
    if spec is None:
      if _IGNORED.search(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
        continue
      raise UserError(f"{source}: unexpected tensor {name!r} for this {config.model_type} config")
    if name in seen:
      raise UserError(f"{source}: tensor {name!r} appears twice")
    seen.add(name)
    path = _param_path(config, spec)
    stacked = config.scan_layers and spec.layer is not None
    shape = shapes[path].shape[1:] if stacked else shapes[path].shape
    w = np.asarray(w)
    if w.shape != _hf_shape(spec, shape):
      raise UserError(f"{source}: tensor {name} has shape {w.shape}, expected "
                      f"{_hf_shape(spec, shape)} from the config")
    w = (w.T if spec.transpose else w).reshape(shape).astype(dtype)
    if not stacked:
      place(path, w)
      continue
    layers = pending.setdefault(path, {})
    layers[spec.layer] = w
    if len(layers) == config.num_layers:
      place(path, np.stack([layers[i] for i in range(config.num_layers)]))
      del pending[path]
  missing = [name for name in specs if name not in seen]
  if missing:
    raise UserError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing in all)")
  return _unflatten(out)


def params_to_hf(config: ModelConfig, params: Any,
                 dtype: str = "float32") -> dict[str, np.ndarray]:
  """transformers-named host arrays ([out, in] weights) in `dtype`."""
  flat = _flatten(params)
  host: dict[tuple[str, ...], np.ndarray] = {}
  out = {}
  for name, spec in tensor_specs(config).items():
    path = _param_path(config, spec)
    if path not in host:  # Fetch a stacked leaf once, then slice layers on the host.
      host[path] = np.asarray(jax.device_get(flat[path]))
    x = host[path]
    if config.scan_layers and spec.layer is not None:
      x = x[spec.layer]
    x = x.reshape(math.prod(x.shape[:spec.n_in]), -1).T if spec.transpose else x.reshape(
        _hf_shape(spec, x.shape))
    out[name] = np.ascontiguousarray(x.astype(jnp.dtype(dtype)))
  return out


def _safetensors_files(directory: str) -> list[str]:
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(single):  # transformers' order of preference.
    return [single]
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f"{index}: expected JSON with a weight_map ({e})") from None
    return [os.path.join(directory, f) for f in sorted(set(weight_map.values()))]
  raise UserError(f"{directory}: expected model.safetensors or model.safetensors.index.json")


def _load_order(name: str) -> tuple[str, int]:
  """Same tensor name of all layers next to each other, layers in order."""
  m = _LAYER.match(name)
  return (_LAYER.sub("model.layers.*.", name), int(m.group(1))) if m else (name, -1)


def iter_safetensors(directory: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) from a HF directory (single or sharded), read lazily one tensor at a time."""
  with contextlib.ExitStack() as stack:
    handles = {}
    for file in _safetensors_files(directory):
      try:
        handles[file] = stack.enter_context(safe_open(file, framework="np"))
      except (OSError, SafetensorError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    keys = sorted(((k, f) for f, h in handles.items() for k in h.keys()),
                  key=lambda kf: _load_order(kf[0]))
    for key, file in keys:
      yield key, handles[file].get_tensor(key)


class Model:
  """A loaded decoder: `.config`, `.params` (plain pytree), `.module`; callable for logits."""

  def __init__(self, config: ModelConfig, params: Any):
    self.config = config
    self.params = params
    self.module = Decoder(config)
    self._apply = jax.jit(self.module.apply)

  def for_inference(self) -> "Model":
    """This model with its matmul weights (kernels, untied head) stored in the compute dtype:
    a frozen model's forward then skips casting them on every call. Same outputs bit for bit,
    the forward casts them to that dtype anyway; the same model at float32."""
    dt = jnp.dtype(self.config.dtype)
    if dt == jnp.float32:
      return self
    cast = lambda path, x: (x.astype(dt) if path[-1].key in ("kernel", "lm_head")  # noqa: E731
                            and jnp.issubdtype(x.dtype, jnp.floating) else x)
    return Model(self.config, jax.tree_util.tree_map_with_path(cast, self.params))

  def __call__(self, input_ids_BxL: Any, attention_mask_BxL: Any = None) -> jax.Array:
    """logits_BxLxV (float32)."""
    mask = None if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL)
    return self._apply({"params": self.params}, jnp.asarray(input_ids_BxL), mask)


def _open(path: str, dtype: str = "float32", param_dtype: str | None = None,
          scan_layers: bool = True, remat: bool = False
          ) -> tuple[ModelConfig, str, Iterator[tuple[str, np.ndarray]]]:
  """(config, source for messages, lazy tensor iterator) of a HF directory or .gguf file; only
  the metadata is read here."""
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise UserError(f"{path}: GGUF file not found")
    from first_jax.models import gguf_io  # Lazy: only GGUF users pay for it.
    hf_config, tensors = gguf_io.read_gguf(path)
    source = path
  else:
    if not os.path.isdir(path):
      raise UserError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    source = os.path.join(path, "config.json")
    try:
      with open(source) as f:
        hf_config = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{source}: expected a readable transformers config.json ({e})") from None
    if not isinstance(hf_config, dict):
      raise UserError(f"{source}: expected a JSON object")
    tensors = iter_safetensors(path)
  config = ModelConfig.from_hf(hf_config, source, dtype=dtype, param_dtype=param_dtype or dtype,
                               scan_layers=scan_layers, remat=remat)
  if not path.endswith(".gguf") and not any(n.endswith(".safetensors") for n in os.listdir(path)):
    raise UserError(f"{path}: expected *.safetensors weights beside config.json")
  return config, source, tensors


def check_pretrained(path: str | os.PathLike) -> ModelConfig:
  """The start-up check of a pre-trained model source: its config (config.json or the GGUF
  metadata) is read and checked, no weights are loaded. Raises UserError naming the file."""
  return _open(os.fspath(path))[0]


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None,
                    rules: Rules | None = None, scan_layers: bool = True, remat: bool = False,
                    param_dtype: str | None = None,
                    on_indivisible: str = "replicate") -> Model:
  """A HF model directory (llama / qwen2 / mistral safetensors) or a .gguf file -> Model.

  `dtype` is the compute dtype and, unless `param_dtype` is given, the param dtype. With a
  `mesh`, each tensor is placed directly with its sharding from `rules` (DEFAULT_RULES).
  """
  config, source, tensors = _open(os.fspath(path), dtype, param_dtype, scan_layers, remat)
  shardings = None
  if mesh is not None:
    shardings = param_shardings(abstract_params(config), mesh, rules or DEFAULT_RULES,
                                on_indivisible)
  return Model(config, hf_to_params(config, tensors, shardings, source))


def save_pretrained(model: Model | tuple[ModelConfig, Any], directory: str | os.PathLike,
                    dtype: str = "float32") -> None:
  """config.json + model.safetensors that transformers' from_pretrained loads unchanged."""
  config, params = (model.config, model.params) if isinstance(model, Model) else model
  if dtype not in DTYPES:
    raise UserError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
  directory = os.fspath(directory)
  tensors = params_to_hf(config, params, dtype)
  with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
    save_file(tensors, tmp, metadata={"format": "pt"})
  atomic_write_json(os.path.join(directory, "config.json"), config.to_hf(dtype))
