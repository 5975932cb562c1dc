"""first_jax.core.calibration against float64 NumPy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.core import calibration


def _ref_bins(conf, num_bins, binning, w):
  if binning == "equal_width":
    edges = (np.arange(1, num_bins) / num_bins).astype(np.float32).astype(np.float64)
    return np.searchsorted(edges, conf, side="left")
  order = np.argsort(conf, kind="stable")
  before = np.cumsum(w[order]) - w[order]
  idx = np.empty(len(conf), int)
  idx[order] = np.clip(np.floor(num_bins * before / w.sum()).astype(int), 0, num_bins - 1)
  return idx


def _ref_stats(conf, correct, num_bins, binning, w):
  conf, correct, w = (np.asarray(a, np.float64) for a in (conf, correct, w))
  idx = _ref_bins(conf, num_bins, binning, w)
  count = np.bincount(idx, w, num_bins)
  cs = np.bincount(idx, w * conf, num_bins)
  acc = np.bincount(idx, w * correct, num_bins)
  safe = np.where(count > 0, count, 1.0)
  ece = np.abs(cs - acc).sum() / w.sum()
  gaps = np.where(count > 0, np.abs(cs - acc) / safe, 0.0)
  return count, cs / safe, acc / safe, ece, gaps.max()


def _data(rng, n):
  conf = rng.uniform(size=n).astype(np.float32)
  conf[:4] = [0.0, 1.0, 0.3, 0.7]  # exact edges / bin boundaries
  correct = (rng.uniform(size=n) < conf ** 1.5).astype(np.float32)
  w = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
  w[rng.uniform(size=n) < 0.2] = 0.0  # padding rows
  return conf, correct, w


@functools.partial(jax.jit, static_argnums=(3, 4))
def _all_metrics(conf, correct, w, num_bins, binning):
  kw = dict(num_bins=num_bins, binning=binning, weights_N=w)
  return (calibration.reliability(conf, correct, **kw), calibration.ece(conf, correct, **kw),
          calibration.mce(conf, correct, **kw))


_ece = jax.jit(calibration.ece, static_argnames=("num_bins", "binning"))


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("num_bins", [1, 10, 15])
@pytest.mark.parametrize("weighted", [False, True])
def test_metrics_match_numpy(binning, num_bins, weighted):
  rng = np.random.default_rng(num_bins + 100 * weighted)
  conf, correct, w = _data(rng, 997)
  w_arg = w if weighted else None
  w_ref = w if weighted else np.ones_like(w)
  count, mconf, acc, ece, mce = _ref_stats(conf, correct, num_bins, binning, w_ref)
  rel, got_ece, got_mce = _all_metrics(conf, correct, w_arg, num_bins, binning)
  np.testing.assert_allclose(np.asarray(rel.count_M), count, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(rel.confidence_M), mconf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rel.accuracy_M), acc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(got_ece), ece, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(got_mce), mce, rtol=1e-5, atol=1e-7)


def test_equal_width_edges_and_counts():
  conf = np.array([0.0, 1.0, 0.1, 0.15, 0.5, 0.999, 1e-7, 0.55], np.float32)
  idx = np.asarray(calibration.bin_index(jnp.asarray(conf), 10))
  np.testing.assert_array_equal(idx, [0, 9, 0, 1, 4, 9, 0, 5])  # (lower, upper]
  idx = np.asarray(calibration.bin_index(jnp.asarray([0.3, 0.7, 0.2, 0.30001], jnp.float32), 10))
  np.testing.assert_array_equal(idx, [2, 6, 1, 3])
  rel = calibration.reliability(conf, np.ones_like(conf), 10)
  assert float(rel.count_M.sum()) == len(conf)


@pytest.mark.parametrize("num_bins", [1, 2, 10, 32, 33, 100])
def test_equal_width_bin_is_the_count_of_edges_below(num_bins):
  """Both ways of binning (compares up to 32 bins, a binary search above) give the number of
  float32 inner edges m / M strictly below c, the edges themselves included."""
  rng = np.random.default_rng(num_bins)
  edges = (np.arange(1, num_bins) / num_bins).astype(np.float32)
  conf = np.concatenate([rng.uniform(0, 1, 2000).astype(np.float32), edges,
                         np.nextafter(edges, np.float32(1)), [0.0, 1.0]]).astype(np.float32)
  got = np.asarray(jax.jit(calibration.bin_index, static_argnums=1)(jnp.asarray(conf), num_bins))
  np.testing.assert_array_equal(got, (conf[:, None] > edges[None, :]).sum(-1))


def test_equal_mass_bins_are_balanced():
  rng = np.random.default_rng(3)
  conf = rng.beta(5, 1, size=1003).astype(np.float32)  # skewed: equal-width bins would not be
  rel = calibration.reliability(conf, np.ones_like(conf), 10, "equal_mass")
  counts = np.asarray(rel.count_M)
  assert counts.sum() == 1003 and counts.max() - counts.min() <= 1
  assert np.all(np.diff(np.asarray(rel.confidence_M)) > 0)  # sorted bins


def test_ece_near_zero_when_calibrated():
  rng = np.random.default_rng(0)
  n = 200_000
  conf = rng.uniform(size=n).astype(np.float32)
  correct = (rng.uniform(size=n) < conf).astype(np.float32)
  assert float(_ece(conf, correct)) < 0.01
  assert float(_ece(conf, correct, binning="equal_mass")) < 0.01
  over = (rng.uniform(size=n) < conf ** 2).astype(np.float32)  # over-confident: E|c - c^2| = 1/6
  assert abs(float(_ece(conf, over)) - 1.0 / 6.0) < 0.01


def test_single_bin_is_confidence_accuracy_gap():
  rng = np.random.default_rng(1)
  conf, correct, w = _data(rng, 500)
  got = float(_ece(conf, correct, num_bins=1, weights_N=w))
  want = abs(np.average(conf, weights=w) - np.average(correct, weights=w))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_padding_rows_count_zero():
  rng = np.random.default_rng(2)
  conf, correct, _ = _data(rng, 300)
  pad_conf = np.concatenate([conf, rng.uniform(size=50).astype(np.float32)])
  pad_corr = np.concatenate([correct, np.ones(50, np.float32)])
  w = np.concatenate([np.ones(300), np.zeros(50)]).astype(np.float32)
  for binning in ("equal_width", "equal_mass"):
    np.testing.assert_allclose(
        float(_ece(pad_conf, pad_corr, binning=binning, weights_N=w)),
        float(_ece(conf, correct, binning=binning)), rtol=1e-6)
  assert float(_ece(conf, correct, weights_N=np.zeros(300, np.float32))) == 0.0


def test_brier_and_nll_match_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(64, 4)) * 2
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labels = rng.integers(0, 4, size=64)
  w = rng.uniform(size=64)
  w[:5] = 0.0
  onehot = np.eye(4)[labels]
  brier_ref = np.average(((np.exp(lp) - onehot) ** 2).sum(-1), weights=w)
  nll_ref = np.average(-lp[np.arange(64), labels], weights=w)
  np.testing.assert_allclose(
      float(jax.jit(calibration.brier)(np.exp(lp).astype(np.float32), labels, w)), brier_ref,
      rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(calibration.nll)(lp.astype(np.float32), labels, w)),
                             nll_ref, rtol=1e-5)
  conf = np.exp(lp[:, 0])
  corr = (labels == 0).astype(np.float64)
  np.testing.assert_allclose(float(calibration.binary_brier(conf, corr, w)),
                             np.average((conf - corr) ** 2, weights=w), rtol=1e-5)
  bnll = -np.where(corr > 0, np.log(conf), np.log1p(-conf))
  np.testing.assert_allclose(
      float(calibration.binary_nll(np.log(conf), np.log1p(-conf), corr, w)),
      np.average(bnll, weights=w), rtol=1e-5)


def test_bad_binning_is_a_user_error():
  with pytest.raises(UserError, match="binning"):
    calibration.ece(np.ones(3), np.ones(3), binning="quantile")
