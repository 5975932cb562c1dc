"""first_jax.core.temperature against float64 NumPy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.core import calibration, temperature, topk


def _ref_rescale(lp, t, mode, tail=None):
  lp = np.asarray(lp, np.float64)
  if tail is not None:
    lp = np.concatenate([lp, np.asarray(tail, np.float64)[..., None]], -1)
  z = np.exp(lp) / t if mode == "prob_softmax" else lp / t
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_ece(conf, correct, w, num_bins=10):
  edges = (np.arange(1, num_bins) / num_bins).astype(np.float32).astype(np.float64)
  idx = np.searchsorted(edges, conf, side="left")
  return np.abs(np.bincount(idx, w * (conf - correct), num_bins)).sum() / w.sum()


def _teacher(n=3000, v=40, k=5, sharpen=1.7, seed=0):
  """Top-k of random logits; targets drawn from a sharper distribution (under-confident)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, v)).astype(np.float32) * 2.0
  p = np.exp(logits * sharpen)
  p /= p.sum(-1, keepdims=True)
  targets = (p.cumsum(-1) > rng.uniform(size=(n, 1))).argmax(-1)
  lp, ids, tail = jax.jit(topk.extract, static_argnums=1)(jnp.asarray(logits), k)
  w = (rng.uniform(size=n) > 0.1).astype(np.float32)
  return np.asarray(lp), np.asarray(ids), targets, np.asarray(tail), w


@pytest.mark.parametrize("mode", temperature.MODES)
@pytest.mark.parametrize("with_tail", [False, True])
def test_rescale_matches_numpy(mode, with_tail):
  lp, _, _, tail, _ = _teacher(n=50, seed=1)
  tail_arg = tail if with_tail else None
  f = jax.jit(functools.partial(temperature.rescale, mode=mode))
  for t in (0.07, 0.5, 1.0, 3.0):
    got = f(lp, jnp.float32(t), tail_logmass_x=tail_arg)  # t traced
    assert got.shape == (50, 6 if with_tail else 5)
    np.testing.assert_allclose(np.asarray(got), _ref_rescale(lp, t, mode, tail_arg),
                               rtol=1e-5, atol=1e-5)
  if mode == "log_space" and with_tail:  # t = 1 is the identity over K + 1 bins
    got = np.asarray(f(lp, 1.0, tail_logmass_x=tail_arg))
    np.testing.assert_allclose(got[:, :5], lp, atol=2e-6)
    np.testing.assert_allclose(got[:, 5], tail, atol=2e-5)
  lp_Kp1 = f(lp, 0.5, tail_logmass_x=tail)
  lp_k, tail_k = lp_Kp1[:, :-1], lp_Kp1[:, -1]
  assert lp_k.shape == (50, 5) and tail_k.shape == (50,)


@pytest.mark.parametrize("mode", temperature.MODES)
def test_search_returns_grid_argmin_and_refines(mode):
  lp, ids, targets, tail, w = _teacher()
  grid = temperature.default_grid(mode)
  run = jax.jit(functools.partial(temperature.search, mode=mode, weights_N=w, refine=False))
  coarse = run(lp, ids, targets)
  correct = (ids[:, 0] == targets).astype(np.float64)
  ref = np.array([_ref_ece(np.exp(_ref_rescale(lp, t, mode)[:, 0]), correct, w) for t in grid])
  np.testing.assert_allclose(np.asarray(coarse.temperatures_T), grid)
  np.testing.assert_allclose(np.asarray(coarse.ece_T), ref, atol=2e-5)
  assert float(coarse.best_t) == float(grid[np.argmin(np.asarray(coarse.ece_T))])
  second, first = np.sort(ref)[1], np.min(ref)
  if second - first > 1e-4:  # not a near-tie: float64 agrees on the winner
    assert float(coarse.best_t) == pytest.approx(float(grid[np.argmin(ref)]))
  # Binary NLL / Brier of the top-1 event.
  r = _ref_rescale(lp, grid[3], mode)
  conf = np.exp(r[:, 0])
  nll = -np.where(correct > 0, r[:, 0], np.log(np.exp(r[:, 1:]).sum(-1)))
  np.testing.assert_allclose(float(coarse.nll_T[3]), np.average(nll, weights=w), rtol=1e-4)
  np.testing.assert_allclose(float(coarse.brier_T[3]),
                             np.average((conf - correct) ** 2, weights=w), rtol=1e-4)
  fine = jax.jit(functools.partial(temperature.search, mode=mode, weights_N=w))(lp, ids, targets)
  n = len(grid)
  assert fine.temperatures_T.shape == (n + 11,)
  assert float(fine.best_ece) <= float(coarse.best_ece)
  assert float(fine.best_ece) == pytest.approx(float(np.min(np.asarray(fine.ece_T))))
  i = int(np.argmin(ref))
  fine_t = np.asarray(fine.temperatures_T[n:])
  lo = grid[i - 1] if i > 0 else grid[0] / 2
  hi = grid[i + 1] if i < n - 1 else 2 * grid[-1] - grid[-2]
  np.testing.assert_allclose([fine_t.min(), fine_t.max()], [lo, hi], rtol=1e-5)
  ref_fine = [_ref_ece(np.exp(_ref_rescale(lp, t, mode)[:, 0]), correct, w) for t in fine_t]
  np.testing.assert_allclose(np.asarray(fine.ece_T[n:]), ref_fine, atol=2e-5)


def test_search_with_tail_and_custom_grid_inside_jit():
  lp, ids, targets, tail, w = _teacher(n=500, seed=3)
  grid = np.array([0.05, 0.1, 0.2, 0.4], np.float32)

  @jax.jit
  def step(lp, ids, targets, tail, w):  # as inside a train step: static grid
    return temperature.search(lp, ids, targets, mode="prob_softmax", grid=grid, weights_N=w,
                              tail_logmass_N=tail, num_bins=15, binning="equal_mass")

  res = step(lp, ids, targets, tail, w)
  assert res.ece_T.shape == (4 + 11,) and np.all(np.isfinite(np.asarray(res.ece_T)))
  conf = np.exp(_ref_rescale(lp, 0.2, "prob_softmax", tail)[:, 0])
  want = float(jax.jit(functools.partial(calibration.ece, num_bins=15, binning="equal_mass"))(
      conf.astype(np.float32), (ids[:, 0] == targets).astype(np.float32), weights_N=w))
  np.testing.assert_allclose(float(res.ece_T[2]), want, atol=1e-5)
  with pytest.raises(UserError, match="grid"):
    temperature.search(lp, ids, targets, mode="log_space", grid=[0.5, 0.2])
  with pytest.raises(UserError, match="mode"):
    temperature.rescale(lp, 1.0, "linear")


def test_fit_nll_temperature_logits_recovers_generating_temperature():
  rng = np.random.default_rng(5)
  n, c, t_true = 20000, 4, 2.0
  logits = (rng.normal(size=(n, c)) * 3).astype(np.float32)
  p = np.exp(logits / t_true)
  p /= p.sum(-1, keepdims=True)
  labels = (p.cumsum(-1) > rng.uniform(size=(n, 1))).argmax(-1)
  fit = jax.jit(temperature.fit_nll_temperature_logits)(logits, labels)
  # float64 reference: a grid over t, then a 100x finer grid around its best point.
  lg = logits.astype(np.float64)

  def nll_at(t):
    z = lg / t
    z = z - z.max(-1, keepdims=True)
    return -(z[np.arange(n), labels] - np.log(np.exp(z).sum(-1))).mean()

  ts = np.linspace(1.0, 4.0, 301)
  best = ts[np.argmin([nll_at(t) for t in ts])]
  ts = np.linspace(best - 0.01, best + 0.01, 201)
  nll = np.array([nll_at(t) for t in ts])
  t_ref = ts[np.argmin(nll)]
  assert abs(float(fit.t) - t_ref) / t_ref < 2e-3
  assert float(fit.nll) <= nll.min() + 1e-5
  assert abs(float(fit.t) - t_true) < 0.15


@pytest.mark.parametrize("mode", temperature.MODES)
def test_fit_nll_temperature_topk_minimises_binary_nll(mode):
  lp, ids, targets, _, w = _teacher(n=2000, seed=6)
  fit = jax.jit(functools.partial(temperature.fit_nll_temperature, mode=mode, weights_N=w))(
      lp, ids, targets)
  correct = (ids[:, 0] == targets).astype(np.float64)
  ts = np.exp(np.linspace(np.log(0.01), np.log(100.0), 3001))

  def bnll(t):
    r = _ref_rescale(lp, t, mode)
    return np.average(-np.where(correct > 0, r[:, 0], np.log(np.exp(r[:, 1:]).sum(-1))),
                      weights=w)

  vals = np.array([bnll(t) for t in ts])
  assert float(fit.nll) <= vals.min() + 1e-5
  np.testing.assert_allclose(float(fit.nll), bnll(float(fit.t)), rtol=1e-4)


def _ref_choice_events(lp, ids, tail, choice_ids, targets, t, mode):
  """float64: re-scaled top-k read at the choices, renormalised; (confidence, correct)."""
  r = _ref_rescale(lp, t, mode, tail)[:, :lp.shape[1]]
  conf, correct = [], []
  for i in range(len(lp)):
    m = np.array([np.exp(r[i][ids[i] == c]).sum() for c in choice_ids[i]])
    z = np.where(m > 0, np.log(np.maximum(m, 1e-300)), -1e4)  # outside the top-k: TAIL_FLOOR
    z = np.where(choice_ids[i] >= 0, z, -np.inf)
    p = np.exp(z - z.max())
    p = p / p.sum()
    conf.append(p.max())
    correct.append(float(choice_ids[i][p.argmax()] == targets[i]))
  return np.asarray(conf), np.asarray(correct)


@pytest.mark.parametrize("mode", temperature.MODES)
def test_choice_scoring_search_matches_numpy(mode):
  """Choices scoring: the softmax over the choice tokens of the re-scaled top-k (+ tail)."""
  rng = np.random.default_rng(7)
  lp, ids, _, tail, w = _teacher(n=400, v=12, k=5, seed=3)
  choice_ids = np.stack([rng.permutation(12)[:4] for _ in range(len(lp))]).astype(np.int32)
  choice_ids[::7, 3] = -1  # some questions have three choices
  targets = choice_ids[np.arange(len(lp)), rng.integers(0, 3, len(lp))]
  grid = np.asarray([0.3, 0.7, 1.0, 2.0], np.float32)
  res = jax.jit(functools.partial(temperature.search, mode=mode, grid=grid, refine=False))(
      lp, ids, targets, weights_N=w, tail_logmass_N=tail, choice_ids_NxC=choice_ids)
  for t, got in zip(grid, np.asarray(res.ece_T)):
    conf, correct = _ref_choice_events(lp, ids, tail, choice_ids, targets, float(t), mode)
    np.testing.assert_allclose(got, _ref_ece(conf, correct, w), atol=2e-5)
  conf = temperature.event_confidence(lp, ids, 0.7, mode, tail, choice_ids)
  ref_conf, ref_correct = _ref_choice_events(lp, ids, tail, choice_ids, targets, 0.7, mode)
  np.testing.assert_allclose(np.asarray(conf), ref_conf, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(temperature.event_correct(lp, ids, targets, choice_ids)), ref_correct)
  assert 0.0 < ref_correct.mean() < 1.0  # the test sees both outcomes


def test_log_space_grid_holds_the_identity():
  grid = temperature.default_grid("log_space")
  assert np.any(grid == np.float32(1.0)) and np.all(np.diff(grid) > 0)
