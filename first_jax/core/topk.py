"""Top-k extraction of a teacher's next-token distribution (plain and vocab-parallel).

Shape letters: V vocabulary, K kept tokens, `x` any leading shape.

Both functions return `(logprobs_xK, ids_xK, tail_logmass_x)`:
- `logprobs_xK`: the K largest log-probabilities, normalised over the FULL vocabulary (the sums
  run in float32 even for bfloat16 logits; float64 logits stay float64), in descending order;
- `ids_xK`: their token ids (int32); ties go to the lower id first, as `lax.top_k` does;
- `tail_logmass_x`: log of the mass outside the top-k, computed relative to the k-th probability
  (see `_capped_sum`) rather than as log(1 - sum), so it stays accurate down to ~1e-6 of the k-th
  probability; `TAIL_FLOOR` (finite) when the tail is empty or below that resolution.

Cost: one `lax.top_k` and one fused reduction over V (the capped sum); the normaliser follows
from it and the top-k values (`_finish`), so there is no max or log-sum-exp pass; no [.., V]
float32 temporaries.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from first_jax.runtime.errors import UserError

# Log-mass standing for "exactly zero": finite so that 0 * log 0 terms stay 0, never NaN.
TAIL_FLOOR = -1.0e4


def acc_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: at least float32 (bf16/f16 -> f32; f64 stays f64 for x64 tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x <= 0, stable on both sides of -ln 2; never -inf or NaN.

  x >= 0 (a mass of 1 up to rounding) gives log(smallest normal) (~ -87 in float32) with zero
  gradient: the mass left is below what the inputs can resolve.
  """
  x = jnp.minimum(x, -jnp.finfo(jnp.result_type(x, jnp.float32)).tiny)
  # Where one branch is unused it may be -inf/NaN; the inputs are made safe so that
  # gradients through the chosen branch stay finite.
  near0 = x > -0.6931471805599453
  x_near = jnp.where(near0, x, -1.0)
  x_far = jnp.where(near0, -1.0, x)
  out = jnp.where(near0, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))
  return jnp.maximum(out, TAIL_FLOOR)


def _kth(vals_xK: jax.Array) -> jax.Array:
  """The k-th largest value, upcast (may be -inf)."""
  # min over K == vals[..., -1] (sorted). A reduce, not a slice: XLA:CPU turns top_k back into
  # a cheap TopK call only when its sorted output is read as a whole; a slice such as
  # vals[..., -1] makes it keep a full sort of [.., V] (measured: +1 float32 copy of logits).
  return jnp.min(vals_xK, axis=-1).astype(acc_dtype(vals_xK.dtype))


def _safe(v_x: jax.Array) -> jax.Array:
  """A k-th value made finite (0 where it is -inf: fewer finite logits than k)."""
  return jnp.where(jnp.isfinite(v_x), v_x, 0.0)


def _capped_sum(logits_xV: jax.Array, v_x: jax.Array) -> jax.Array:
  """sum_v min(exp(l_v - v), 1) for the k-th value `v_x` (finite): the one pass over V.

  Every entry >= v adds exactly 1 and there are exactly K of them counted in the top-k
  (entries above v plus the kept ties), so `sum - K` is the tail mass relative to v: no
  comparisons or masks over V (it fuses into the reduction, nothing of size V is materialised),
  and cancellation only against the small integer K.
  """
  return jnp.sum(jnp.minimum(jnp.exp(logits_xV.astype(v_x.dtype) - v_x[..., None]), 1.0),
                 axis=-1)


def _finish(vals_xK: jax.Array, m_x: jax.Array, v_x: jax.Array, capped_x: jax.Array):
  """Log-probs and tail log-mass from the top-k values and the capped sum. The total mass
  follows from them (relative to the max m: tail * exp(v - m) + sum_K exp(vals - m), every
  term >= 0), so no log-sum-exp pass over V is needed."""
  k = vals_xK.shape[-1]
  tail_rel_x = capped_x - k  # relative to exp(v)
  # An all -inf tail (k >= number of finite logits) has zero mass.
  has_tail_x = (tail_rel_x > 0) & jnp.isfinite(v_x)
  log_tail_x = (jnp.log(jnp.where(has_tail_x, tail_rel_x, 1.0)) + _safe(v_x)
                - m_x)  # relative to exp(m)
  kept_x = jnp.sum(jnp.exp(vals_xK.astype(m_x.dtype) - m_x[..., None]), axis=-1)
  log_total_x = jnp.logaddexp(jnp.where(has_tail_x, log_tail_x, -jnp.inf), jnp.log(kept_x))
  tail_logmass_x = jnp.where(has_tail_x, log_tail_x - log_total_x, TAIL_FLOOR)
  logprobs_xK = vals_xK.astype(m_x.dtype) - (m_x + log_total_x)[..., None]
  return logprobs_xK, jnp.maximum(tail_logmass_x, TAIL_FLOOR)


def _scale(vals_xK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, k-th value) from the top-k values, upcast; the max made finite (0 for a row of all
  -inf, which has no mass)."""
  m_x = jnp.max(vals_xK, axis=-1).astype(acc_dtype(vals_xK.dtype))  # a reduce: see `_kth`
  return jnp.where(jnp.isfinite(m_x), m_x, 0.0), _kth(vals_xK)



def extract(logits_xV: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k log-probabilities, ids and tail log-mass of `logits_xV` (see module docstring)."""
  vocab = logits_xV.shape[-1]
  if not 1 <= k <= vocab:
    raise UserError(f"k: expected 1 <= k <= vocab size {vocab}, got {k}")
  vals_xK, ids_xK = jax.lax.top_k(logits_xV, k)
  m_x, v_x = _scale(vals_xK)
  logprobs_xK, tail_x = _finish(vals_xK, m_x, v_x, _capped_sum(logits_xV, _safe(v_x)))
  return logprobs_xK, ids_xK.astype(jnp.int32), tail_x


def _shard_map(f, mesh, in_specs, out_specs):
  # jax.shard_map is public from 0.7 on; the experimental module is the fallback.
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # pragma: no cover
  return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def extract_vocab_parallel(logits_xV: jax.Array, k: int, mesh: Mesh, axis_name: str = "vocab",
                           leading_spec: Sequence[str | tuple[str, ...] | None] | None = None,
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`extract` for logits sharded over mesh axis `axis_name` on the vocab dimension.

  Each shard takes its own top-k; the K * n candidates are all-gathered and merged with a
  second `lax.top_k` (shard-major order = ascending ids among equal values, so the ids are
  bit-identical to `extract`); each shard then sums its part of the lse / tail statistics
  relative to the merged k-th value (`_capped_sum`), added with one psum. Communication is
  O(x * K * n), never O(x * V).

  Args:
    logits_xV: logits; V must be divisible by the size of `axis_name`.
    k: kept tokens; at most V / (size of `axis_name`).
    mesh: the mesh (any axis types; shard_map works on Auto and Explicit alike).
    axis_name: the mesh axis the vocabulary is split over.
    leading_spec: PartitionSpec entries of the leading dims (e.g. ("data", None) for [B, L, V]
      with the batch over "data"); default: replicated.
  Returns:
    (logprobs_xK, ids_xK, tail_logmass_x), sharded like the leading dims.
  """
  lead = tuple(leading_spec) if leading_spec is not None else (None,) * (logits_xV.ndim - 1)
  if len(lead) != logits_xV.ndim - 1:
    raise UserError(f"leading_spec: expected {logits_xV.ndim - 1} entries, got {len(lead)}")
  n = mesh.shape[axis_name]
  vocab = logits_xV.shape[-1]
  if vocab % n:
    raise UserError(f"mesh.{axis_name}: vocab size {vocab} is not divisible by {n} shards")
  if not 1 <= k <= vocab // n:
    raise UserError(f"k: expected 1 <= k <= vocab per shard {vocab // n}, got {k}")

  def local(logits_xv):
    vloc = logits_xv.shape[-1]
    vals_xk, ids_xk = jax.lax.top_k(logits_xv, k)
    ids_xk = ids_xk.astype(jnp.int32) + jax.lax.axis_index(axis_name).astype(jnp.int32) * vloc
    # [n, x, k] -> [x, n * k]: shard-major, so equal values stay in ascending-id order.
    cand_vals = jnp.moveaxis(jax.lax.all_gather(vals_xk, axis_name), 0, -2)
    cand_ids = jnp.moveaxis(jax.lax.all_gather(ids_xk, axis_name), 0, -2)
    cand_vals = cand_vals.reshape(*cand_vals.shape[:-2], n * k)
    cand_ids = cand_ids.reshape(*cand_ids.shape[:-2], n * k)
    vals_xK, pos_xK = jax.lax.top_k(cand_vals, k)
    ids_xK = jnp.take_along_axis(cand_ids, pos_xK, axis=-1)
    # The merged top-k holds the global max and k-th value: every shard sums relative to the
    # same k-th value (a shard of all -inf logits does not set it), then the sums are added.
    m_x, v_x = _scale(vals_xK)
    capped_x = jax.lax.psum(_capped_sum(logits_xv, _safe(v_x)), axis_name)
    logprobs_xK, tail_x = _finish(vals_xK, m_x, v_x, capped_x)
    return logprobs_xK, ids_xK, tail_x

  f = _shard_map(local, mesh, in_specs=P(*lead, axis_name),
                 out_specs=(P(*lead, None), P(*lead, None), P(*lead)))
  return f(logits_xV)
