"""Mixed-precision contractions: compute-dtype operands, float32 accumulation, both ways.

`einsum(spec, a, b, dtype)` is `jnp.einsum` whose products run in `dtype` and accumulate in
float32 (`preferred_element_type`), returning float32 for the caller to cast once. At float32
it is the plain einsum. At bfloat16 its gradient is written out: the float32 cotangent is cast
to bfloat16 once and both transposed contractions run bf16 x bf16 -> float32 as well. JAX's
own transpose of a float32-result dot contracts the float32 cotangent with the bf16 operand, a
mixed dot that XLA:CPU upcasts and runs at float32 speed (bench/profile_step.py --dtype
bfloat16: every backward matmul of the step was an f32 x f32 dot); this is the rule PyTorch's
autocast follows (bf16 gradients into bf16 matmuls). Each input's gradient comes back in that
input's own dtype, so a float32 master weight gets a float32-accumulated gradient.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _terms(spec: str) -> tuple[str, str, str]:
  parts = spec.replace(" ", "").split("->")
  if len(parts) != 2 or parts[0].count(",") != 1:
    raise ValueError(f"einsum spec {spec!r}: expected two operands and an explicit output")
  (a, b), out = parts[0].split(","), parts[1]
  for s in (a, b, out):
    if not all(ch.isalpha() for ch in s) or len(set(s)) != len(s):
      raise ValueError(f"einsum spec {spec!r}: letters only, each once per term")
  for x in set(a + b + out):
    if (x in a) + (x in b) + (x in out) < 2:  # an index of one term alone: a plain sum
      raise ValueError(f"einsum spec {spec!r}: index {x!r} must appear in two terms or more")
  return a, b, out


def _contract(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  """`spec` on the operands cast to `dtype` (a no-op where they already are), float32 result."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_lowp(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  return _contract(spec, a, b, dtype)


def _fwd(spec, a, b, dtype):
  a_lo, b_lo = a.astype(dtype), b.astype(dtype)
  # the residuals in the compute dtype; the zero-size arrays carry the inputs' dtypes
  return _contract(spec, a_lo, b_lo, dtype), (a_lo, b_lo, jnp.zeros((0,), a.dtype),
                                              jnp.zeros((0,), b.dtype))


def _bwd(spec, dtype, res, g):
  a_lo, b_lo, a_dt, b_dt = res
  ta, tb, to = _terms(spec)
  g_lo = g.astype(dtype)  # the float32 cotangent cast once, used by both contractions
  da = _contract(f"{to},{tb}->{ta}", g_lo, b_lo, dtype)
  db = _contract(f"{ta},{to}->{tb}", a_lo, g_lo, dtype)
  return da.astype(a_dt.dtype), db.astype(b_dt.dtype)


_einsum_lowp.defvjp(_fwd, _bwd)


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
  """float32 result of `spec` (two operands, explicit output, no ellipsis, every index in
  two terms or all three) with the products in `dtype`, accumulated in float32."""
  _terms(spec)
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return _contract(spec, a, b, dtype)
  return _einsum_lowp(spec, a, b, dtype)
