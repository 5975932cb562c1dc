"""Llama-family decoder (Llama, Qwen2, Mistral) in Flax Linen, numerically matching transformers.

Shape letters (see docs/design.md): B batch, L query positions, M key positions, D width,
V vocab, H query heads, G key-value heads, R = H // G query heads per kv head, E head_dim,
F MLP width.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `norm`, plus `layers` when scanned) that `first_jax.runtime.sharding` maps onto a mesh.

Precision: `config.dtype` is the matmuls' operand dtype; every matmul accumulates in float32,
forward and backward (`precision.einsum`), and everything between the matmuls (residual
stream, norms, RoPE, softmax, SiLU) and the logits are float32. `config.param_dtype` is the
stored weights'.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from first_jax.runtime.errors import UserError
from first_jax.runtime.sharding import unbox
from first_jax.models import precision
from first_jax.models.config import ModelConfig

# A finite "minus infinity": a fully masked row (a padded query) softmaxes to uniform, not NaN.
_MASKED = float(np.finfo(np.float32).min)


def _fan_in_normal(n_in: int):
  """N(0, 1/fan_in) over the first `n_in` axes (the contracted ones)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:n_in])
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
  return init


def _letters(*counts: int) -> tuple[str, ...]:
  """Disjoint runs of einsum index letters, one run per count."""
  pool, out = iter("abcefghijklmnopqrstuwxyz"), []  # d and v are the head's
  for n in counts:
    out.append("".join(next(pool) for _ in range(n)))
  return tuple(out)


class Linear(nn.Module):
  """y = x @ kernel (+ bias), contracting x's last len(in_shape) axes; kernel is in+out shaped.

  Mixed precision: the operands in the compute `dtype`, the products accumulated in float32
  (`preferred_element_type`) in the forward and the backward pass (`precision.einsum`), the bias
  added in float32; the result is float32, as every activation between matmuls. At float32 this
  is the plain matmul; at bfloat16 it is what the hardware runs fast (XLA:CPU's AMX / AVX512-BF16 path, TPU MXU, GPU tensor
  cores all accumulate in float32; a bf16-result dot on XLA:CPU ran at float32 speed,
  docs/benchmarks.md)."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.in_shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(_fan_in_normal(n), self.axes),
                        self.in_shape + self.out_shape, self.param_dtype)
    lead, ins, outs = _letters(x.ndim - n, n, len(self.out_shape))
    y = precision.einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n:]),
                        self.out_shape, self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y


class RMSNorm(nn.Module):
  """x / rms(x) * scale, in float32 like transformers (the next matmul casts its operand)."""

  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x_xD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x_xD.shape[-1],), self.param_dtype)
    x32_xD = x_xD.astype(jnp.float32)
    y_xD = x32_xD * jax.lax.rsqrt(jnp.mean(x32_xD * x32_xD, axis=-1, keepdims=True) + self.eps)
    return scale_D.astype(jnp.float32) * y_xD


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [E/2] (float32), with Llama-3 or linear scaling applied."""
  e = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
  scaling = config.rope_scaling_dict()
  kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_cos_sin(pos_BxL: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, E] float32 for the rotate-half convention."""
  freqs_BxLxE2 = pos_BxL.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
  emb_BxLxE = jnp.concatenate([freqs_BxLxE2, freqs_BxLxE2], axis=-1)
  return jnp.cos(emb_BxLxE), jnp.sin(emb_BxLxE)


def apply_rope(x_BxLxHxE: jax.Array, cos_BxLxE: jax.Array, sin_BxLxE: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x_BxLxHxE, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = (t[:, :, None, :].astype(x_BxLxHxE.dtype) for t in (cos_BxLxE, sin_BxLxE))
  return x_BxLxHxE * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query attention: query head h reads kv head h // R (transformers' repeat_kv)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, keep_BxLxM, cos_BxLxE, sin_BxLxE):
    c = self.config
    d, h, g, e = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

    def proj(name, heads, axis):
      return Linear((d,), (heads, e), ("embed", axis, "head_dim"), c.attention_bias, dt, pdt,
                    name=name)(x_BxLxD)

    q_BxLxHxE = apply_rope(proj("q_proj", h, "heads"), cos_BxLxE, sin_BxLxE)
    k_BxMxGxE = apply_rope(proj("k_proj", g, "kv_heads"), cos_BxLxE, sin_BxLxE)
    v_BxMxGxE = proj("v_proj", g, "kv_heads")
    b, l = x_BxLxD.shape[:2]
    q_BxLxGxRxE = q_BxLxHxE.reshape(b, l, g, h // g, e)
    s_BxGxRxLxM = precision.einsum("blgre,bmge->bgrlm", q_BxLxGxRxE, k_BxMxGxE, dt) * (e ** -0.5)
    s_BxGxRxLxM = jnp.where(keep_BxLxM[:, None, None], s_BxGxRxLxM, _MASKED)
    p_BxGxRxLxM = jax.nn.softmax(s_BxGxRxLxM, axis=-1)
    o_BxLxGxRxE = precision.einsum("bgrlm,bmge->blgre", p_BxGxRxLxM, v_BxMxGxE, dt)
    o_BxLxHxE = o_BxLxGxRxE.reshape(b, l, h, e)
    return Linear((h, e), (d,), ("heads", "head_dim", "embed"), False, dt, pdt,
                  name="o_proj")(o_BxLxHxE)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    d, f = c.hidden_size, c.intermediate_size
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    gate_BxLxF = Linear((d,), (f,), ("embed", "mlp"), False, dt, pdt, name="gate_proj")(x_BxLxD)
    up_BxLxF = Linear((d,), (f,), ("embed", "mlp"), False, dt, pdt, name="up_proj")(x_BxLxD)
    return Linear((f,), (d,), ("mlp", "embed"), False, dt, pdt,
                  name="down_proj")(nn.silu(gate_BxLxF) * up_BxLxF)


class DecoderLayer(nn.Module):
  """Pre-norm block; returns (h, None) so it can be the body of `nn.scan`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, keep_BxLxM, cos_BxLxE, sin_BxLxE):
    c = self.config
    pdt = jnp.dtype(c.param_dtype)
    norm = lambda name: RMSNorm(c.rms_norm_eps, pdt, name=name)
    h_BxLxD = h_BxLxD + Attention(c, name="attn")(norm("attn_norm")(h_BxLxD), keep_BxLxM,
                                                  cos_BxLxE, sin_BxLxE)
    h_BxLxD = h_BxLxD + Mlp(c, name="mlp")(norm("mlp_norm")(h_BxLxD))
    return h_BxLxD, None


class Decoder(nn.Module):
  """Causal LM. Params: embed [V,D], layers (stacked [N,...] when scanned, else layers_i),
  final_norm, lm_head [D,V] (absent when tied)."""

  config: ModelConfig

  def setup(self):
    c = self.config
    pdt = jnp.dtype(c.param_dtype)
    # std 1/sqrt(D): tied logits start at unit scale (RMSNorm rescales the residual input anyway).
    self.embed = self.param("embed", nn.with_logical_partitioning(
        nn.initializers.normal(c.hidden_size ** -0.5), ("vocab", "embed")),
                            (c.vocab_size, c.hidden_size), pdt)
    block = DecoderLayer
    if c.remat:
      block = nn.remat(block, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 3, length=c.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = stack(c)
    else:
      self.layers = [block(c) for _ in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, pdt)
    if not c.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
          _fan_in_normal(1), ("embed", "vocab")), (c.hidden_size, c.vocab_size), pdt)

  def hidden(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None):
    """Final-normed hidden states h_BxLxD (float32; the head casts them to the compute dtype)."""
    c = self.config
    b, l = input_ids_BxL.shape
    if attention_mask_BxL is None:
      attention_mask_BxL = jnp.ones((b, l), bool)
    valid_BxL = attention_mask_BxL.astype(bool)
    # Positions count real tokens, so left- and right-padded rows get the same RoPE phases.
    pos_BxL = jnp.maximum(jnp.cumsum(valid_BxL, axis=-1) - 1, 0)
    keep_BxLxM = jnp.tril(jnp.ones((l, l), bool))[None] & valid_BxL[:, None, :]
    if c.sliding_window is not None:
      keep_BxLxM &= (pos_BxL[:, :, None] - pos_BxL[:, None, :]) < c.sliding_window
    cos_BxLxE, sin_BxLxE = rope_cos_sin(pos_BxL, c)
    # Clamp, don't NaN-fill, out-of-range ids: a padding id like -100 must not poison the
    # masked keys (0 * NaN is NaN); real ids are checked against the tokenizer elsewhere.
    h_BxLxD = jnp.take(self.embed, input_ids_BxL, axis=0, mode="clip").astype(jnp.float32)
    if c.scan_layers:
      h_BxLxD, _ = self.layers(h_BxLxD, keep_BxLxM, cos_BxLxE, sin_BxLxE)
    else:
      for layer in self.layers:
        h_BxLxD, _ = layer(h_BxLxD, keep_BxLxM, cos_BxLxE, sin_BxLxE)
    return self.final_norm(h_BxLxD)

  def logits_from_hidden(self, h_xD: jax.Array) -> jax.Array:
    """The output head on any leading shape; logits are float32."""
    dt = jnp.dtype(self.config.dtype)
    lead = _letters(h_xD.ndim - 1, 0, 0)[0]
    if self.config.tie_word_embeddings:
      return precision.einsum(f"{lead}d,vd->{lead}v", h_xD, self.embed, dt)
    return precision.einsum(f"{lead}d,dv->{lead}v", h_xD, self.lm_head, dt)

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None):
    return self.logits_from_hidden(self.hidden(input_ids_BxL, attention_mask_BxL))


def abstract_params(config: ModelConfig) -> Any:
  """Boxed (logically partitioned) ShapeDtypeStructs of the params, without allocating."""
  ids_1x1 = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(Decoder(config).init, jax.random.key(0), ids_1x1)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
  """Random plain (unboxed) params on the default device."""
  ids_1x1 = jnp.zeros((1, 1), jnp.int32)
  return jax.jit(lambda r: unbox(Decoder(config).init(r, ids_1x1)["params"]))(rng)


def layer_params(config: ModelConfig, params: Any, i: int) -> Any:
  """The params of layer i, stacked or not."""
  if config.scan_layers:
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


def layer_subset(config: ModelConfig, params: Any,
                 layers: Sequence[int]) -> tuple[ModelConfig, Any]:
  """A student initialised from chosen teacher layers (embeddings, final norm, head copied)."""
  layers = list(layers)
  bad = [i for i in layers
         if not isinstance(i, (int, np.integer)) or not 0 <= i < config.num_layers]
  if not layers or bad:
    raise UserError(f"layers: expected a non-empty list of layer indices in [0, "
                    f"{config.num_layers}), got {layers}")
  new_config = config.replace(num_layers=len(layers))
  new_params = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layers_")}
  if config.scan_layers:
    index = np.asarray(layers)
    new_params["layers"] = jax.tree.map(lambda x: x[index], params["layers"])
  else:
    for j, i in enumerate(layers):
      new_params[f"layers_{j}"] = params[f"layers_{i}"]
  return new_config, new_params


def trim_vocab(config: ModelConfig, params: Any, vocab_size: int) -> tuple[ModelConfig, Any]:
  """Drops padded embedding/head rows beyond the tokenizer's `vocab_size` (e.g. Qwen's
  151936-token tokenizer on a 152064-row model); a larger tokenizer is a real mismatch."""
  if vocab_size > config.vocab_size:
    raise UserError(f"tokenizer: vocab size {vocab_size} is larger than the model's vocab_size "
                    f"{config.vocab_size}; the tokenizer does not belong to this model")
  if vocab_size == config.vocab_size:
    return config, params
  new_params = dict(params, embed=params["embed"][:vocab_size])
  if "lm_head" in params:
    new_params["lm_head"] = params["lm_head"][:, :vocab_size]
  return config.replace(vocab_size=vocab_size), new_params


def apply_fn(module) -> Callable:
  """`apply(params, ids_BxL, mask_BxL)` -> logits; `hidden_only=True` -> final hidden states;
  `apply(params, h_xD, head_only=True)` -> the output head on given hidden states."""
  def apply(params, x, attention_mask_BxL=None, *, hidden_only=False, head_only=False):
    variables = {"params": params}
    if head_only:
      return module.apply(variables, x, method=module.logits_from_hidden)
    if hidden_only:
      return module.apply(variables, x, attention_mask_BxL, method=module.hidden)
    return module.apply(variables, x, attention_mask_BxL)
  return apply
