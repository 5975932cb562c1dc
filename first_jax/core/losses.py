"""Distillation and cross-entropy losses, token-weighted.

Shape letters: B batch, L length, V vocabulary, K teacher's kept tokens.

Every loss returns `(loss_sum, weight_sum)` (float32 scalars; float64 for float64 logits): the
masked sum over positions and the sum of the mask, so averages over devices and micro-batches
are token-weighted (`total_sum / total_weight`). Masks are [B, L] floats; a row may be all 0;
masked positions may hold any finite teacher values (or -inf) and any target id.

Memory: the student's log-normaliser over V (`log_normalizer`) is a fused, optionally
vocab-chunked reduction in >= float32 that never materialises a float32 copy of [B, L, V]
logits, and whose custom gradient is one fused elementwise softmax in the logits' own dtype;
student values at the teacher's ids are an O(B * L * K) gather (`gather_logits`).
Teacher inputs are data: they are wrapped in `stop_gradient`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from first_jax.runtime.errors import UserError
from first_jax.core import sampled
from first_jax.core.topk import acc_dtype, log1mexp, TAIL_FLOOR

TAILS = ("bucket", "renormalize")
DIRECTIONS = ("forward", "reverse", "jsd")


def _int_view(logits_xV: jax.Array) -> tuple[jax.Array, bool]:
  """Sub-32-bit floats viewed as same-width unsigned ints (a free bitcast).

  XLA:CPU has no bf16 gather / dynamic-slice: it upcasts the WHOLE operand to float32 first
  (measured: +622 MB of temporaries at B=2, L=512, V=151936). Indexing the integer view avoids
  that; elsewhere the bitcast costs nothing.
  """
  if jnp.issubdtype(logits_xV.dtype, jnp.floating) and logits_xV.dtype.itemsize < 4:
    uint = jnp.dtype(f"uint{8 * logits_xV.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(logits_xV, uint), True
  return logits_xV, False


def _from_view(x: jax.Array, viewed: bool, dtype) -> jax.Array:
  return (jax.lax.bitcast_convert_type(x, dtype) if viewed else x).astype(acc_dtype(dtype))


@jax.custom_vjp
def gather_logits(logits_xV: jax.Array, ids_xK: jax.Array) -> jax.Array:
  """logits at ids (last axis, ids clipped to [0, V)), upcast: an O(x * K) gather."""
  view_xV, viewed = _int_view(logits_xV)
  at_xK = jnp.take_along_axis(view_xV, ids_xK.astype(jnp.int32), axis=-1, mode="clip")
  return _from_view(at_xK, viewed, logits_xV.dtype)


def _gather_fwd(logits_xV, ids_xK):
  return gather_logits(logits_xV, ids_xK), (logits_xV, ids_xK)


def _gather_bwd(res, g_xK):
  # The integer view has no gradient: transpose the plain float gather instead.
  logits_xV, ids_xK = res
  gather = lambda l: jnp.take_along_axis(l, ids_xK.astype(jnp.int32), axis=-1,
                                         mode="clip").astype(acc_dtype(l.dtype))
  (g_xV,) = jax.vjp(gather, logits_xV)[1](g_xK)
  return g_xV, None


gather_logits.defvjp(_gather_fwd, _gather_bwd)


def _slice_upcast(logits_xV: jax.Array, start: jax.Array, width: int) -> jax.Array:
  """logits[..., start:start + width], upcast (see `_int_view`)."""
  view_xV, viewed = _int_view(logits_xV)
  x_xC = jax.lax.dynamic_slice_in_dim(view_xV, start, width, axis=-1)
  return _from_view(x_xC, viewed, logits_xV.dtype)


def _lse_impl(logits_xV: jax.Array, chunk: int | None) -> jax.Array:
  vocab = logits_xV.shape[-1]
  acc = acc_dtype(logits_xV.dtype)
  if chunk is None or chunk >= vocab:
    # The max is exact in the input dtype; the convert fuses into the sum.
    m_x = jnp.max(logits_xV, axis=-1).astype(acc)
    m_safe_x = jnp.where(jnp.isfinite(m_x), m_x, 0.0)
    s_x = jnp.sum(jnp.exp(logits_xV.astype(acc) - m_safe_x[..., None]), axis=-1)
    return m_safe_x + jnp.log(s_x)
  # Online log-sum-exp over chunks. The last chunk is clamped to end at V (dynamic_slice
  # semantics) and its overlap with the previous one masked out: no padded copy of V.
  n = -(-vocab // chunk)

  def body(i, carry):
    m_x, s_x = carry
    start = jnp.minimum(i * chunk, vocab - chunk)
    fresh = (jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) + start) >= i * chunk
    x_xC = jnp.where(fresh, _slice_upcast(logits_xV, start, chunk), -jnp.inf)
    m_new_x = jnp.maximum(m_x, jnp.max(x_xC, axis=-1))
    m_safe_x = jnp.where(jnp.isfinite(m_new_x), m_new_x, 0.0)
    s_x = s_x * jnp.exp(m_x - m_safe_x) + jnp.sum(jnp.exp(x_xC - m_safe_x[..., None]), axis=-1)
    return m_new_x, s_x

  shape = logits_xV.shape[:-1]
  m_x, s_x = jax.lax.fori_loop(0, n, body, (jnp.full(shape, -jnp.inf, acc),
                                            jnp.zeros(shape, acc)))
  return jnp.where(jnp.isfinite(m_x), m_x, 0.0) + jnp.log(s_x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def log_normalizer(logits_xV: jax.Array, chunk: int | None = None) -> jax.Array:
  """log-sum-exp over the last axis, accumulated in >= float32 (`acc_dtype`) for any dtype.

  chunk=None: one fused pass (no [.., V] temporary where the compiler fuses the convert into
  the reduction: XLA:CPU does). chunk=c: an online log-sum-exp over vocab chunks of c (a
  `fori_loop`), temporaries O(x * c) whatever the compiler. The gradient is one fused
  elementwise softmax, returned in the logits' dtype.
  """
  return _lse_impl(logits_xV, chunk)


def _lse_fwd(logits_xV, chunk):
  lse_x = _lse_impl(logits_xV, chunk)
  return lse_x, (logits_xV, lse_x)


def _lse_bwd(chunk, res, g_x):
  del chunk
  logits_xV, lse_x = res
  soft_xV = jnp.exp(logits_xV.astype(lse_x.dtype) - lse_x[..., None])
  return ((g_x[..., None] * soft_xV).astype(logits_xV.dtype),)


log_normalizer.defvjp(_lse_fwd, _lse_bwd)


def _divergence(p_xB: jax.Array, q_xB: jax.Array, direction: str, beta: float) -> jax.Array:
  """Divergence between two distributions given as log-probs over the last axis (bins)."""
  if direction == "forward":
    return jnp.sum(jnp.exp(p_xB) * (p_xB - q_xB), axis=-1)
  if direction == "reverse":
    return jnp.sum(jnp.exp(q_xB) * (q_xB - p_xB), axis=-1)
  # Generalised JSD (GKD): beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.
  m_xB = jnp.logaddexp(p_xB + jnp.log(beta), q_xB + jnp.log1p(-beta))
  return (beta * jnp.sum(jnp.exp(p_xB) * (p_xB - m_xB), axis=-1)
          + (1.0 - beta) * jnp.sum(jnp.exp(q_xB) * (q_xB - m_xB), axis=-1))


def _masked_sums(loss_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  mask_BxL = jnp.asarray(mask_BxL, loss_BxL.dtype)
  # where, not multiply: garbage at masked positions must not leak (0 * inf = NaN).
  return jnp.sum(jnp.where(mask_BxL > 0, loss_BxL * mask_BxL, 0.0)), jnp.sum(mask_BxL)


def topk_kd(student_logits_BxLxV: jax.Array, teacher_ids_BxLxK: jax.Array,
            teacher_logprobs_BxLxK: jax.Array, mask_BxL: jax.Array, *, tail: str = "bucket",
            direction: str = "forward", teacher_tail_logmass_BxL: jax.Array | None = None,
            beta: float = 0.5, vocab_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Top-k distillation loss between the teacher's kept tokens and the student.

  Args:
    student_logits_BxLxV: student logits (any float dtype; reductions run in >= float32).
    teacher_ids_BxLxK: teacher's top-k ids (distinct per position).
    teacher_logprobs_BxLxK: teacher log-probs at those ids, already temperature-rescaled by
      the caller (e.g. the first K entries of `rescale(lp, t, mode, tail)`).
    mask_BxL: position weights (0 = ignore).
    tail: "bucket": divergence over K + 1 bins, the last = 1 - (mass on the K ids) on each
      side; "renormalize": both sides renormalised over the K ids (any tail is ignored).
    direction: "forward" KL(teacher || student), "reverse" KL(student || teacher), or "jsd"
      (generalised Jensen-Shannon with weight `beta` in (0, 1) on the teacher).
    teacher_tail_logmass_BxL: teacher's tail log-mass (bucket); default log(1 - sum exp(lp)).
    vocab_chunk: static chunk size for the student's log-normaliser (None: one fused pass).
  Returns:
    (loss_sum, weight_sum): the per-position divergence summed with the mask, and sum(mask).
  """
  if tail not in TAILS:
    raise UserError(f"distill.tail: expected one of {TAILS}, got {tail!r}")
  if direction not in DIRECTIONS:
    raise UserError(f"distill.direction: expected one of {DIRECTIONS}, got {direction!r}")
  if direction == "jsd" and not 0.0 < beta < 1.0:
    raise UserError(f"distill.beta: expected 0 < beta < 1, got {beta}")
  ids_BxLxK = jax.lax.stop_gradient(teacher_ids_BxLxK).astype(jnp.int32)
  acc = acc_dtype(student_logits_BxLxV.dtype)
  t_lp_BxLxK = jnp.clip(jax.lax.stop_gradient(teacher_logprobs_BxLxK).astype(acc),
                        TAIL_FLOOR, 0.0)
  # O(B * L * K) gather on the original logits; only these K values are upcast.
  s_at_BxLxK = gather_logits(student_logits_BxLxV, ids_BxLxK)
  if tail == "renormalize":
    p_BxLxK = jax.nn.log_softmax(t_lp_BxLxK, axis=-1)
    q_BxLxK = jax.nn.log_softmax(s_at_BxLxK, axis=-1)
    return _masked_sums(_divergence(p_BxLxK, q_BxLxK, direction, beta), mask_BxL)
  if teacher_tail_logmass_BxL is None:
    t_tail_BxL = log1mexp(jax.nn.logsumexp(t_lp_BxLxK, axis=-1))
  else:
    t_tail_BxL = jax.lax.stop_gradient(teacher_tail_logmass_BxL).astype(acc)
  t_tail_BxL = jnp.clip(t_tail_BxL, TAIL_FLOOR, 0.0)
  s_lp_BxLxK = s_at_BxLxK - log_normalizer(student_logits_BxLxV, vocab_chunk)[..., None]
  # Student tail = 1 - (its mass on the teacher's ids): the ids are not the student's top-k,
  # so the capped-sum trick of `topk` does not apply; log1mexp keeps it finite and stable.
  q_tail_BxL = log1mexp(jax.nn.logsumexp(s_lp_BxLxK, axis=-1))
  p_BxLxK1 = jnp.concatenate([t_lp_BxLxK, t_tail_BxL[..., None]], axis=-1)
  q_BxLxK1 = jnp.concatenate([s_lp_BxLxK, q_tail_BxL[..., None]], axis=-1)
  return _masked_sums(_divergence(p_BxLxK1, q_BxLxK1, direction, beta), mask_BxL)


def sampled_kd(student_logits_BxLxV: jax.Array, teacher_ids_BxLxU: jax.Array,
               teacher_logprobs_BxLxU: jax.Array, teacher_log_threshold_BxL: jax.Array,
               mask_BxL: jax.Array, *, vocab_chunk: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """Forward KL(teacher || student) estimated from a priority sample of the teacher.

  Per position, with the sample's weights w_u = max(p_u, tau) (`sampled.log_weights`; E[w_v]
  = p_v for every token v, 0 when v is not kept):

      loss = lse(student) + sum_u w_u (log p_u - student_logit_u)

  Its expectation over the draw is KL(p || softmax(student)) exactly, and its gradient with
  respect to the student's logits, softmax(student) - sum_u w_u e_u, has expectation
  softmax(student) - p: the full-vocabulary forward-KL gradient (the log-sum-exp term is kept
  exact rather than weighted by sum_u w_u, which is 1 only on average). Memory as `topk_kd`:
  an O(B * L * U) gather and the fused (optionally vocab-chunked) log-normaliser.

  Args:
    teacher_ids_BxLxU, teacher_logprobs_BxLxU: the kept tokens and their exact log-probs at the
      sampling temperature (TAIL_FLOOR: an empty slot, weight 0).
    teacher_log_threshold_BxL: log tau of each position's sample.
  """
  ids_BxLxU = jax.lax.stop_gradient(teacher_ids_BxLxU).astype(jnp.int32)
  acc = acc_dtype(student_logits_BxLxV.dtype)
  t_lp_BxLxU = jax.lax.stop_gradient(teacher_logprobs_BxLxU).astype(acc)
  log_w_BxLxU = sampled.log_weights(
      t_lp_BxLxU, jax.lax.stop_gradient(teacher_log_threshold_BxL).astype(acc))
  w_BxLxU = jnp.exp(log_w_BxLxU)  # an empty slot's TAIL_FLOOR gives exactly 0
  s_at_BxLxU = gather_logits(student_logits_BxLxV, ids_BxLxU)
  lse_BxL = log_normalizer(student_logits_BxLxV, vocab_chunk)
  # where, not multiply: an empty slot's TAIL_FLOOR log-prob times weight 0 stays 0
  terms_BxLxU = jnp.where(w_BxLxU > 0, w_BxLxU * (t_lp_BxLxU - s_at_BxLxU), 0.0)
  return _masked_sums(lse_BxL + jnp.sum(terms_BxLxU, axis=-1), mask_BxL)


def full_kd(student_logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array,
            mask_BxL: jax.Array, *, temperature: float = 1.0,
            scale_by_t2: bool = True) -> tuple[jax.Array, jax.Array]:
  """Forward KL(softmax(teacher / T) || softmax(student / T)) over the full vocabulary.

  Multiplied by T^2 when `scale_by_t2` (Hinton et al.: keeps gradient size independent of T).
  """
  inv_t = 1.0 / temperature
  # Scaled after the upcast (a bf16 multiply would round before the reduction).
  acc = acc_dtype(student_logits_BxLxV.dtype)
  t32 = jax.lax.stop_gradient(teacher_logits_BxLxV).astype(acc) * inv_t
  s32 = student_logits_BxLxV.astype(acc) * inv_t
  t_lse_BxL = jax.nn.logsumexp(t32, axis=-1)
  s_lse_BxL = log_normalizer(s32)
  p_BxLxV = jnp.exp(t32 - t_lse_BxL[..., None])
  # sum_v p (log p - log q) = sum_v p (t_v - s_v) - lse_t + lse_s (sum_v p = 1).
  kl_BxL = jnp.sum(p_BxLxV * (t32 - s32), axis=-1) - t_lse_BxL + s_lse_BxL
  if scale_by_t2:
    kl_BxL = kl_BxL * (temperature * temperature)
  return _masked_sums(kl_BxL, mask_BxL)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array, *,
                  label_smoothing: float = 0.0, smoothing_ids_BxLxC: jax.Array | None = None,
                  vocab_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy, optionally against (1 - eps) one-hot + eps * uniform (smoothing).

  The uniform is over the vocabulary, or over `smoothing_ids_BxLxC` where given (e.g. the
  answer letters of a multiple-choice question; ids < 0 are padding and left out).
  The vocabulary term uses mean_v log p_v = mean_v logits_v - lse: no one-hot over V is built.
  Targets are clipped to [0, V): masked positions may hold any id (e.g. -100).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise UserError(f"label_smoothing: expected 0 <= eps < 1, got {label_smoothing}")
  lse_BxL = log_normalizer(logits_BxLxV, vocab_chunk)
  at_BxL = gather_logits(logits_BxLxV, jnp.asarray(targets_BxL, jnp.int32)[..., None])[..., 0]
  loss_BxL = lse_BxL - at_BxL
  if label_smoothing > 0.0 and smoothing_ids_BxLxC is not None:
    ids_BxLxC = jnp.asarray(smoothing_ids_BxLxC, jnp.int32)
    valid_BxLxC = (ids_BxLxC >= 0).astype(lse_BxL.dtype)
    at_BxLxC = gather_logits(logits_BxLxV, jnp.maximum(ids_BxLxC, 0))
    mean_BxL = (jnp.sum(at_BxLxC * valid_BxLxC, axis=-1)
                / jnp.maximum(jnp.sum(valid_BxLxC, axis=-1), 1.0))
    loss_BxL = (1.0 - label_smoothing) * loss_BxL + label_smoothing * (lse_BxL - mean_BxL)
  elif label_smoothing > 0.0:
    mean_BxL = jnp.mean(logits_BxLxV.astype(lse_BxL.dtype), axis=-1)
    loss_BxL = (1.0 - label_smoothing) * loss_BxL + label_smoothing * (lse_BxL - mean_BxL)
  return _masked_sums(loss_BxL, mask_BxL)
