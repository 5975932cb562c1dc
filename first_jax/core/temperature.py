"""Temperature re-scaling of top-k distributions, ECE-minimising search, NLL fits.

Shape letters: N events, K kept tokens, C classes, T temperatures, `x` any leading shape.

Two re-scalings (both return log-probabilities):
- "prob_softmax" (FIRST's reference code): softmax(p / t) over the probabilities p = exp(logprobs).
  Small t sharpens; t = 1 is already much flatter than the input (the logits p lie in [0, 1]).
  Entries of zero probability still get weight exp(0) — that is the paper's formula.
- "log_space" (Guo et al. 2017): softmax(log p / t) = p^(1/t) renormalised; t = 1 is the identity.

With a tail log-mass (see `first_jax.core.topk`) the tail is one more bin: inputs [..., K] + [...]
give outputs [..., K + 1] whose last entry is the re-scaled tail (`[..., :-1]` and `[..., -1]`
are what `first_jax.core.losses.topk_kd` takes). Without a tail the K entries are re-scaled among themselves.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from first_jax.runtime.errors import UserError
from first_jax.core import calibration
from first_jax.core.topk import TAIL_FLOOR

MODES = ("prob_softmax", "log_space")


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise UserError(f"temperature.mode: expected one of {MODES}, got {mode!r}")


def rescale(logprobs_xK: jax.Array, t: jax.Array | float, mode: str,
            tail_logmass_x: jax.Array | None = None) -> jax.Array:
  """Re-scaled log-probs: [..., K] without a tail, [..., K + 1] (last = tail) with one."""
  _check_mode(mode)
  lp_xK = jnp.asarray(logprobs_xK, jnp.float32)
  if tail_logmass_x is not None:
    lp_xK = jnp.concatenate([lp_xK, jnp.asarray(tail_logmass_x, jnp.float32)[..., None]], -1)
  lp_xK = jnp.maximum(lp_xK, TAIL_FLOOR)  # -inf in -> finite out (0 * log 0 stays 0)
  t = jnp.asarray(t, jnp.float32)
  z_xK = jnp.exp(lp_xK) / t if mode == "prob_softmax" else lp_xK / t
  return jax.nn.log_softmax(z_xK, axis=-1)


def default_grid(mode: str) -> np.ndarray:
  """Coarse grid: the paper's (0, 1] step 0.1 widened both ways / log-spaced 0.05..20 plus 1.

  log_space holds t = 1 exactly (the identity: the teacher as it is); in prob_softmax no
  temperature is the identity (see `rescale`), so the raw teacher is scored separately.
  """
  _check_mode(mode)
  if mode == "prob_softmax":
    return np.concatenate([[0.01, 0.02, 0.03, 0.05, 0.07], np.linspace(0.1, 1.0, 10),
                           [1.25, 1.5, 2.0, 3.0]]).astype(np.float32)
  return np.union1d(np.geomspace(0.05, 20.0, 28), [1.0]).astype(np.float32)  # t = 1: identity


class SearchResult(NamedTuple):
  """All arrays; `temperatures_T` is the coarse grid followed by the fine one (if any)."""
  best_t: jax.Array
  best_ece: jax.Array
  temperatures_T: jax.Array
  ece_T: jax.Array
  nll_T: jax.Array    # NLL of the binary event "top-1 is correct"
  brier_T: jax.Array  # Brier score of the same event


def choice_logprobs(logprobs_NxK: jax.Array, ids_NxK: jax.Array,
                    choice_ids_NxC: jax.Array) -> jax.Array:
  """Top-k log-probs read at the choice tokens and renormalised over the choices.

  This is how a multiple-choice answer is scored (`evaluate.scoring=choices`): the softmax over
  the answer letters. A choice outside the top-k gets log-prob TAIL_FLOOR before the
  renormalisation (about 0); padding choices (id -1) get -inf.
  """
  match_NxCxK = choice_ids_NxC[:, :, None] == ids_NxK[:, None, :]
  lp_NxCxK = jnp.where(match_NxCxK, logprobs_NxK[:, None, :], -jnp.inf)
  lp_NxC = jnp.maximum(jax.nn.logsumexp(lp_NxCxK, axis=-1), TAIL_FLOOR)
  lp_NxC = jnp.where(choice_ids_NxC >= 0, lp_NxC, -jnp.inf)
  return jax.nn.log_softmax(lp_NxC, axis=-1)


def event_correct(logprobs_NxK: jax.Array, ids_NxK: jax.Array, targets_N: jax.Array,
                  choice_ids_NxC: jax.Array | None = None) -> jax.Array:
  """1.0 where the predicted token is the target: the top-1 id, or the most likely choice.

  Both re-scalings keep the order of the entries, so the prediction does not depend on t.
  """
  if choice_ids_NxC is None:
    pred_N = ids_NxK[:, 0]
  else:
    lp_NxC = choice_logprobs(jnp.asarray(logprobs_NxK, jnp.float32), ids_NxK, choice_ids_NxC)
    pred_N = jnp.take_along_axis(choice_ids_NxC, jnp.argmax(lp_NxC, -1)[:, None], -1)[:, 0]
  return (pred_N == targets_N).astype(jnp.float32)


def _top1_logs(logprobs_NxK, tail_N, t, mode, ids_NxK=None, choice_ids_NxC=None):
  """log(conf) and log(1 - conf) of the re-scaled top-1 bin (or of the most likely choice)."""
  r_NxK = rescale(logprobs_NxK, t, mode, tail_N)
  if choice_ids_NxC is not None:
    k = ids_NxK.shape[-1]
    lp_NxC = choice_logprobs(r_NxK[:, :k], ids_NxK, choice_ids_NxC)
    best_N = jnp.argmax(lp_NxC, axis=-1)
    others_NxC = jnp.where(jnp.arange(lp_NxC.shape[-1]) == best_N[:, None], -jnp.inf, lp_NxC)
    log_rest_N = jnp.maximum(jax.nn.logsumexp(others_NxC, axis=-1), TAIL_FLOOR)
    return jnp.max(lp_NxC, axis=-1), log_rest_N
  if r_NxK.shape[-1] == 1:  # k = 1 and no tail: conf is 1
    return r_NxK[:, 0], jnp.full(r_NxK.shape[:1], TAIL_FLOOR)
  # 1 - conf as the mass of the other bins: exact where 1 - exp(log conf) rounds to 0.
  return r_NxK[:, 0], jnp.maximum(jax.nn.logsumexp(r_NxK[:, 1:], axis=-1), TAIL_FLOOR)


def event_confidence(logprobs_NxK: jax.Array, ids_NxK: jax.Array, t: jax.Array | float,
                     mode: str, tail_logmass_N: jax.Array | None = None,
                     choice_ids_NxC: jax.Array | None = None) -> jax.Array:
  """Confidence of each event at temperature t: re-scaled top-1 (or most likely choice)."""
  _check_mode(mode)
  lp_NxK = jnp.asarray(logprobs_NxK, jnp.float32)
  return jnp.exp(_top1_logs(lp_NxK, tail_logmass_N, t, mode, ids_NxK, choice_ids_NxC)[0])


def _top1_metrics(logprobs_NxK, tail_N, correct_N, weights_N, t, mode, num_bins, binning,
                  ids_NxK=None, choice_ids_NxC=None):
  log_conf_N, log_rest_N = _top1_logs(logprobs_NxK, tail_N, t, mode, ids_NxK, choice_ids_NxC)
  conf_N = jnp.exp(log_conf_N)
  return (calibration.ece(conf_N, correct_N, num_bins, binning, weights_N),
          calibration.binary_nll(log_conf_N, log_rest_N, correct_N, weights_N),
          calibration.binary_brier(conf_N, correct_N, weights_N))


def _scan(fn: Callable, grid_T: jax.Array):
  """fn at every temperature inside one compiled loop (the grid may be long, N large)."""
  return jax.lax.scan(lambda carry, t: (carry, fn(t)), None, grid_T)[1]


def search(logprobs_NxK: jax.Array, ids_NxK: jax.Array, targets_N: jax.Array, *, mode: str,
           num_bins: int = 10, binning: str = "equal_width", grid=None, refine: bool = True,
           refine_points: int = 11, weights_N: jax.Array | None = None,
           tail_logmass_N: jax.Array | None = None,
           choice_ids_NxC: jax.Array | None = None) -> SearchResult:
  """Trustworthy maximisation: the temperature minimising the teacher's ECE.

  Events are scored the way the evaluation scores a model. Without `choice_ids_NxC`:
  confidence = re-scaled probability of ids[:, 0] (the order is kept by both modes), correct =
  ids[:, 0] == targets (full-vocabulary top-1). With it: the re-scaled top-k read at the choice
  tokens and renormalised over them (`choice_logprobs`); confidence = the most likely choice's
  probability, correct = its token is the target. The ECE (and binary NLL / Brier) of every grid
  temperature is computed in one `lax.scan`; with `refine`, a second scan covers [grid[i-1], grid[i+1]] around
  the best index i with `refine_points` points (11: step = spacing / 5, the paper's 0.02 around a
  0.1 grid; at the ends the bracket is [grid[0] / 2, ...] or [..., 2 grid[-1] - grid[-2]]).
  best_t is the first argmin over all evaluated temperatures, so it is exactly the grid argmin
  when refine=False and never worse than it otherwise. Jittable as a whole; mode, num_bins,
  binning, refine, refine_points and the grid's length are static.

  Args:
    logprobs_NxK: teacher top-k log-probs (descending).
    ids_NxK: their token ids.
    targets_N: the gold token of each event.
    grid: ascending positive temperatures (default `default_grid(mode)`).
    weights_N: 0 for padding rows.
    tail_logmass_N: if given, re-scaling includes the tail bin (see `rescale`).
  """
  _check_mode(mode)
  grid_T = jnp.asarray(default_grid(mode) if grid is None else grid, jnp.float32)
  if grid_T.ndim != 1 or grid_T.shape[0] < 1:
    raise UserError(f"temperature.grid: expected a non-empty 1-D grid, got shape {grid_T.shape}")
  if isinstance(grid, (np.ndarray, list, tuple)):
    g = np.asarray(grid, np.float64)
    if np.any(g <= 0) or np.any(np.diff(g) <= 0):
      raise UserError("temperature.grid: expected strictly ascending positive temperatures")
  correct_N = event_correct(logprobs_NxK, ids_NxK, targets_N, choice_ids_NxC)
  lp_NxK = jnp.asarray(logprobs_NxK, jnp.float32)
  fn = lambda t: _top1_metrics(lp_NxK, tail_logmass_N, correct_N, weights_N, t, mode, num_bins,
                               binning, ids_NxK, choice_ids_NxC)
  ece_T, nll_T, brier_T = _scan(fn, grid_T)
  temps_T = grid_T
  if refine:
    n = grid_T.shape[0]
    i = jnp.argmin(ece_T)
    lo = jnp.where(i > 0, grid_T[jnp.maximum(i - 1, 0)], grid_T[0] * 0.5)
    hi_edge = 2.0 * grid_T[-1] - grid_T[-2] if n > 1 else 2.0 * grid_T[0]
    hi = jnp.where(i < n - 1, grid_T[jnp.minimum(i + 1, n - 1)], hi_edge)
    fine_R = lo + (hi - lo) * jnp.linspace(0.0, 1.0, refine_points, dtype=jnp.float32)
    ece_R, nll_R, brier_R = _scan(fn, fine_R)
    temps_T = jnp.concatenate([grid_T, fine_R])
    ece_T = jnp.concatenate([ece_T, ece_R])
    nll_T = jnp.concatenate([nll_T, nll_R])
    brier_T = jnp.concatenate([brier_T, brier_R])
  best = jnp.argmin(ece_T)
  return SearchResult(temps_T[best], ece_T[best], temps_T, ece_T, nll_T, brier_T)


class Fit(NamedTuple):
  """The fitted temperature and the NLL it reaches."""
  t: jax.Array
  nll: jax.Array


def _minimize_log_t(obj: Callable, t_min: float, t_max: float, grid_points: int,
                    iters: int) -> Fit:
  """Scanned grid over log t to bracket the minimum, then golden-section search."""
  u_T = jnp.linspace(math.log(t_min), math.log(t_max), grid_points, dtype=jnp.float32)
  f_T = _scan(lambda u: obj(jnp.exp(u)), u_T)
  i = jnp.argmin(f_T)
  a, b = u_T[jnp.maximum(i - 1, 0)], u_T[jnp.minimum(i + 1, grid_points - 1)]
  r = (math.sqrt(5.0) - 1.0) / 2.0
  c, d = b - r * (b - a), a + r * (b - a)

  def body(_, s):
    a, b, c, d, fc, fd = s
    left = fc < fd  # minimum in [a, d]: drop (d, b]
    a, b = jnp.where(left, a, c), jnp.where(left, d, b)
    new = jnp.where(left, b - r * (b - a), a + r * (b - a))
    fnew = obj(jnp.exp(new))
    c2, d2 = jnp.where(left, new, d), jnp.where(left, c, new)
    fc2, fd2 = jnp.where(left, fnew, fd), jnp.where(left, fc, fnew)
    return a, b, c2, d2, fc2, fd2

  s = (a, b, c, d, obj(jnp.exp(c)), obj(jnp.exp(d)))
  a, b, *_ = jax.lax.fori_loop(0, iters, body, s)
  u = 0.5 * (a + b)
  fu = obj(jnp.exp(u))
  better = fu <= f_T[i]
  return Fit(jnp.exp(jnp.where(better, u, u_T[i])), jnp.where(better, fu, f_T[i]))


def fit_nll_temperature(logprobs_NxK: jax.Array, ids_NxK: jax.Array, targets_N: jax.Array, *,
                        mode: str, weights_N: jax.Array | None = None,
                        tail_logmass_N: jax.Array | None = None,
                        choice_ids_NxC: jax.Array | None = None, t_min: float = 0.01,
                        t_max: float = 100.0, grid_points: int = 49, iters: int = 40) -> Fit:
  """Temperature minimising the binary NLL of the events of `search` (same scoring)."""
  _check_mode(mode)
  correct_N = event_correct(logprobs_NxK, ids_NxK, targets_N, choice_ids_NxC)
  lp_NxK = jnp.asarray(logprobs_NxK, jnp.float32)

  def obj(t):
    log_conf_N, log_rest_N = _top1_logs(lp_NxK, tail_logmass_N, t, mode, ids_NxK,
                                        choice_ids_NxC)
    return calibration.binary_nll(log_conf_N, log_rest_N, correct_N, weights_N)

  return _minimize_log_t(obj, t_min, t_max, grid_points, iters)


def fit_nll_temperature_logits(logits_NxC: jax.Array, labels_N: jax.Array,
                               weights_N: jax.Array | None = None, *, t_min: float = 0.01,
                               t_max: float = 100.0, grid_points: int = 49,
                               iters: int = 40) -> Fit:
  """Standard temperature scaling: t minimising NLL of log_softmax(logits / t) at the labels."""
  z_NxC = jnp.asarray(logits_NxC, jnp.float32)
  obj = lambda t: calibration.nll(jax.nn.log_softmax(z_NxC / t, axis=-1), labels_N, weights_N)
  return _minimize_log_t(obj, t_min, t_max, grid_points, iters)
