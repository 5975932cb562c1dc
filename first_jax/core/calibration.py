"""Calibration metrics: ECE, MCE, reliability bins, Brier, NLL.

Shape letters: N events (examples or tokens), C classes, M bins.

Every function takes optional `weights_N` (default 1): a row of weight 0 (padding) counts for
nothing, and weighted statistics are sums of weights, so bin counts always add up to the
total weight. All functions are jittable (no Python loop over N); `num_bins` and `binning`
are static.

Binning rules:
- "equal_width": bin m (0-based) holds confidences in (e_m, e_{m+1}], e_m = float32(m / M);
  confidence 0 (or below) goes to the first bin and 1 (or above) to the last.
- "equal_mass": sort by confidence (stable); an event whose preceding cumulative weight is W_<
  goes to bin floor(M * W_< / W), clipped to M - 1, where W is the total weight. Unweighted,
  that is `np.array_split` of the sorted events: bins differ in size by at most one; equal
  confidences may fall on both sides of a bin boundary.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from first_jax.runtime.errors import UserError

BINNINGS = ("equal_width", "equal_mass")


class Reliability(NamedTuple):
  """Per-bin statistics; mean confidence and accuracy are 0 in empty bins."""
  count_M: jax.Array       # sum of weights in the bin
  confidence_M: jax.Array  # weighted mean confidence
  accuracy_M: jax.Array    # weighted mean correctness


def _weights(x_N: jax.Array, weights_N: jax.Array | None) -> jax.Array:
  if weights_N is None:
    return jnp.ones(x_N.shape[0], jnp.float32)
  return jnp.asarray(weights_N, jnp.float32)


_UNROLLED_BINS = 32  # up to this many bins, bin_index compares with every edge


def bin_index(confidence_N: jax.Array, num_bins: int, binning: str = "equal_width",
              weights_N: jax.Array | None = None) -> jax.Array:
  """Bin (0..M-1, int32) of each event under `binning` (see module docstring)."""
  if binning not in BINNINGS:
    raise UserError(f"binning: expected one of {BINNINGS}, got {binning!r}")
  if num_bins < 1:
    raise UserError(f"num_bins: expected >= 1, got {num_bins}")
  conf_N = jnp.asarray(confidence_N, jnp.float32)
  if binning == "equal_width":
    # Compare with the edges rather than ceil(c * M): 0.3 lands in (0.2, 0.3] even though
    # float32(0.3) * 10 rounds either way. The bin is the number of inner edges below c: for
    # the usual few bins, one fused pass of compares (3.8x faster on XLA:CPU than
    # searchsorted's default scan at 10 bins, the temperature search's inner loop).
    inner_edges = np.asarray(np.arange(1, num_bins) / num_bins, np.float32)
    if num_bins > _UNROLLED_BINS:
      return jnp.searchsorted(jnp.asarray(inner_edges), conf_N, side="left",
                              method="scan_unrolled").astype(jnp.int32)
    idx_N = jnp.zeros(conf_N.shape, jnp.int32)
    for edge in inner_edges:
      idx_N = idx_N + (conf_N > edge).astype(jnp.int32)
    return idx_N
  w_N = _weights(conf_N, weights_N)
  order_N = jnp.argsort(conf_N, stable=True)
  w_sorted_N = w_N[order_N]
  before_N = jnp.cumsum(w_sorted_N) - w_sorted_N
  total = jnp.maximum(jnp.sum(w_N), jnp.finfo(jnp.float32).tiny)
  idx_sorted_N = jnp.clip(jnp.floor(num_bins * before_N / total).astype(jnp.int32), 0,
                          num_bins - 1)
  return jnp.zeros_like(idx_sorted_N).at[order_N].set(idx_sorted_N)


def _bin_sums(confidence_N, correct_N, num_bins, binning, weights_N):
  conf_N = jnp.asarray(confidence_N, jnp.float32)
  corr_N = jnp.asarray(correct_N, jnp.float32)
  w_N = _weights(conf_N, weights_N)
  idx_N = bin_index(conf_N, num_bins, binning, w_N)
  seg = lambda v_N: jax.ops.segment_sum(v_N, idx_N, num_segments=num_bins)
  return seg(w_N), seg(w_N * conf_N), seg(w_N * corr_N)


def reliability(confidence_N: jax.Array, correct_N: jax.Array, num_bins: int = 10,
                binning: str = "equal_width", weights_N: jax.Array | None = None) -> Reliability:
  """Weighted count, mean confidence and accuracy of each bin."""
  count_M, conf_sum_M, corr_sum_M = _bin_sums(confidence_N, correct_N, num_bins, binning,
                                               weights_N)
  safe_M = jnp.where(count_M > 0, count_M, 1.0)
  return Reliability(count_M, jnp.where(count_M > 0, conf_sum_M / safe_M, 0.0),
                     jnp.where(count_M > 0, corr_sum_M / safe_M, 0.0))


def ece(confidence_N: jax.Array, correct_N: jax.Array, num_bins: int = 10,
        binning: str = "equal_width", weights_N: jax.Array | None = None) -> jax.Array:
  """Expected calibration error: sum_m W_m / W * |conf_m - acc_m| (0 when W = 0)."""
  count_M, conf_sum_M, corr_sum_M = _bin_sums(confidence_N, correct_N, num_bins, binning,
                                               weights_N)
  total = jnp.maximum(jnp.sum(count_M), jnp.finfo(jnp.float32).tiny)
  return jnp.sum(jnp.abs(conf_sum_M - corr_sum_M)) / total


def mce(confidence_N: jax.Array, correct_N: jax.Array, num_bins: int = 10,
        binning: str = "equal_width", weights_N: jax.Array | None = None) -> jax.Array:
  """Maximum calibration error: max over non-empty bins of |conf_m - acc_m| (0 if none)."""
  rel = reliability(confidence_N, correct_N, num_bins, binning, weights_N)
  gap_M = jnp.where(rel.count_M > 0, jnp.abs(rel.confidence_M - rel.accuracy_M), 0.0)
  return jnp.max(gap_M)


def _weighted_mean(v_N: jax.Array, weights_N: jax.Array | None) -> jax.Array:
  w_N = _weights(v_N, weights_N)
  return jnp.sum(w_N * v_N) / jnp.maximum(jnp.sum(w_N), jnp.finfo(jnp.float32).tiny)


def brier(probs_NxC: jax.Array, labels_N: jax.Array,
          weights_N: jax.Array | None = None) -> jax.Array:
  """Multi-class Brier score: weighted mean over N of sum_c (p_c - onehot_c)^2, in [0, 2]."""
  p_NxC = jnp.asarray(probs_NxC, jnp.float32)
  p_label_N = jnp.take_along_axis(p_NxC, labels_N[:, None].astype(jnp.int32), axis=-1,
                                  mode="clip")[:, 0]
  # sum_c (p_c - y_c)^2 = sum_c p_c^2 - 2 p_label + 1: no one-hot needed.
  return _weighted_mean(jnp.sum(p_NxC * p_NxC, axis=-1) - 2.0 * p_label_N + 1.0, weights_N)


def nll(logprobs_NxC: jax.Array, labels_N: jax.Array,
        weights_N: jax.Array | None = None) -> jax.Array:
  """Weighted mean negative log-likelihood of the labels."""
  lp_NxC = jnp.asarray(logprobs_NxC, jnp.float32)
  lp_N = jnp.take_along_axis(lp_NxC, labels_N[:, None].astype(jnp.int32), axis=-1,
                             mode="clip")[:, 0]
  return _weighted_mean(-lp_N, weights_N)


def binary_brier(confidence_N: jax.Array, correct_N: jax.Array,
                 weights_N: jax.Array | None = None) -> jax.Array:
  """Brier score of the binary event "top-1 is correct": mean (conf - correct)^2."""
  d_N = jnp.asarray(confidence_N, jnp.float32) - jnp.asarray(correct_N, jnp.float32)
  return _weighted_mean(d_N * d_N, weights_N)


def binary_nll(log_confidence_N: jax.Array, log_one_minus_N: jax.Array, correct_N: jax.Array,
               weights_N: jax.Array | None = None) -> jax.Array:
  """NLL of the binary event "top-1 is correct", from log(conf) and log(1 - conf)."""
  c_N = jnp.asarray(correct_N, jnp.float32)
  v_N = -jnp.where(c_N > 0.5, log_confidence_N, log_one_minus_N)
  return _weighted_mean(v_N, weights_N)


def summary(confidence_N: jax.Array, correct_N: jax.Array,
            num_bins: tuple[int, ...]) -> dict:
  """The calibration metrics every report carries, as Python floats: `ece{M}` (equal width) and
  `ece{M}_mass` (equal mass) for each bin count M, `ece` and `mce` at the first, and its
  reliability bins (count, mean confidence, accuracy)."""
  out = {}
  for nb in num_bins:
    for binning, tag in (("equal_width", ""), ("equal_mass", "_mass")):
      out[f"ece{nb}{tag}"] = float(ece(confidence_N, correct_N, nb, binning))
  out["ece"] = out[f"ece{num_bins[0]}"]
  out["mce"] = float(mce(confidence_N, correct_N, num_bins[0]))
  rel = reliability(confidence_N, correct_N, num_bins[0])
  out["reliability"] = {"count": np.asarray(rel.count_M).tolist(),
                        "confidence": np.asarray(rel.confidence_M).tolist(),
                        "accuracy": np.asarray(rel.accuracy_M).tolist()}
  return out
