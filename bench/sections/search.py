"""bench/run.py's search section: the calibrate stage's ECE temperature search against a NumPy loop."""
from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import check, Context, interleaved, log, ratio, Settings, STORE_VOCABS


def synthetic_events(n: int, k: int, vocab: int, seed: int,
                     candidates: int = 64) -> dict[str, np.ndarray]:
  """n seeded teacher events as the calibrate stage reads them from the store: top-k log-probs
  (descending), their ids (distinct), the tail log-mass and the gold token.

  Each event's distribution is a softmax over `candidates` Gaussian logits with a per-event
  scale (lognormal: top-1 probabilities from ~0.1 to ~1); the top-1 is correct with probability
  p1 ** 1.5 (an over-confident teacher, as the paper finds), else the gold is another id.
  """
  rng = np.random.default_rng(seed)
  scale_N = rng.lognormal(1.0, 0.5, n)
  z_NxC = rng.standard_normal((n, candidates)) * scale_N[:, None]
  z_NxC -= z_NxC.max(-1, keepdims=True)
  p_NxC = np.exp(z_NxC)
  p_NxC /= p_NxC.sum(-1, keepdims=True)
  p_NxC = -np.sort(-p_NxC, axis=-1)
  logprobs_NxK = np.log(p_NxC[:, :k]).astype(np.float32)
  tail_N = np.log(np.maximum(p_NxC[:, k:].sum(-1), 1e-30)).astype(np.float32)
  first_N = rng.integers(0, vocab, n)
  ids_NxK = ((first_N[:, None] + np.arange(k) * max(1, vocab // k)) % vocab).astype(np.int32)
  correct_N = rng.random(n) < p_NxC[:, 0] ** 1.5
  other_N = (first_N + 1 + rng.integers(0, vocab - 1, n)) % vocab  # never the top-1 id
  targets_N = np.where(correct_N, first_N, other_N).astype(np.int32)
  return {"logprobs": logprobs_NxK, "ids": ids_NxK, "tail": tail_N, "targets": targets_N}


def numpy_ece_curve(logprobs_NxK: np.ndarray, ids_NxK: np.ndarray, targets_N: np.ndarray,
                    tail_N: np.ndarray | None, grid_T: np.ndarray, mode: str,
                    num_bins: int = 10) -> np.ndarray:
  """The baseline: the ECE of every temperature with NumPy, as a user would write the search.

  A Python loop over the temperatures, each vectorised over the events: re-scale the top-k
  (+ tail bin) as `first_jax.core.temperature.rescale` defines it (prob_softmax: softmax(p / t);
  log_space: softmax(log p / t)), confidence = the re-scaled top-1, correct = top-1 id == gold,
  10 equal-width bins (m/10, (m+1)/10] (first_jax.core.calibration), ECE = sum |conf - acc| W_m / W.
  The bins axis is put first once ([K + 1, N]): NumPy's reductions over a short last axis are
  several times slower, and the baseline should not be handicapped by its layout.
  """
  from first_jax.core.topk import TAIL_FLOOR
  lp_BxN = np.asarray(logprobs_NxK, np.float32).T
  if tail_N is not None:
    lp_BxN = np.concatenate([lp_BxN, np.asarray(tail_N, np.float32)[None, :]], 0)
  lp_BxN = np.ascontiguousarray(np.maximum(lp_BxN, np.float32(TAIL_FLOOR)))
  base_BxN = np.exp(lp_BxN) if mode == "prob_softmax" else lp_BxN
  correct_N = (ids_NxK[:, 0] == targets_N).astype(np.float64)
  edges = (np.arange(1, num_bins) / num_bins).astype(np.float32)
  ece_T = np.empty(len(grid_T), np.float64)
  for i, t in enumerate(np.asarray(grid_T, np.float32)):
    z_BxN = base_BxN / t
    z_BxN -= z_BxN.max(0)
    conf_N = np.exp(z_BxN[0] - np.log(np.exp(z_BxN).sum(0)))
    bin_N = np.searchsorted(edges, conf_N, side="left")
    conf_sum = np.bincount(bin_N, conf_N, num_bins)
    corr_sum = np.bincount(bin_N, correct_N, num_bins)
    ece_T[i] = np.abs(conf_sum - corr_sum).sum() / max(len(conf_N), 1)
  return ece_T


def section_search(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  from first_jax.core import temperature
  from first_jax.runtime import xla_options
  n, nt, mode, nb = s.search_events, s.search_temps, s.search_mode, 10
  ev = synthetic_events(n, s.k, STORE_VOCABS[-1], s.seed)
  coarse = temperature.default_grid(mode)
  grid_T = np.geomspace(coarse[0], coarse[-1], nt).astype(np.float32)
  search = jax.jit(lambda lp, ids, tg, tail, grid: temperature.search(
      lp, ids, tg, mode=mode, num_bins=nb, refine=False, grid=grid, tail_logmass_N=tail),
      compiler_options=xla_options.fused_dots(jax.devices()[0].platform))  # as calibrate
  dev = jax.block_until_ready(jax.device_put(
      (ev["logprobs"], ev["ids"], ev["targets"], ev["tail"], grid_T)))
  held: dict[str, Any] = {}

  def first_jax():  # the compiled search; its curve and best temperature back on the host
    res = search(*dev)
    held["jax"] = jax.device_get((res.ece_T, res.best_t))

  def numpy_fn():
    ece_T = numpy_ece_curve(ev["logprobs"], ev["ids"], ev["targets"], ev["tail"], grid_T, mode,
                            nb)
    held["numpy"] = (ece_T, grid_T[int(np.argmin(ece_T))])

  log(f"search: {nt} temperatures x {n} events ({mode}), warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "numpy": numpy_fn}, s.warmup, s.reps)
  (jax_ece, jax_t), (np_ece, np_t) = held["jax"], held["numpy"]
  jax_ece = np.asarray(jax_ece, np.float64)
  i_jax, i_np = int(np.argmin(jax_ece)), int(np.argmin(np_ece))
  # float32 vs NumPy rounding may move a confidence across a bin edge: at most 2 / N each
  atol = 1e-5 + 4.0 / n
  diff = float(np.abs(jax_ece - np_ece).max())
  check(np.allclose(jax_ece, np_ece, rtol=0, atol=atol),
        f"search: ECE curves differ by up to {diff:.3g} (atol {atol:.3g})")
  check(float(jax_t) == float(grid_T[i_jax]), "search: best_t is not the curve's argmin")
  tie = abs(jax_ece[i_np] - jax_ece[i_jax]) <= atol and abs(np_ece[i_np] - np_ece[i_jax]) <= atol
  check(i_jax == i_np or tie, f"search: best t {float(jax_t)} (first_jax) vs {float(np_t)} "
                               "(numpy), not a tie")
  return {"shapes": {"events": n, "temperatures": nt, "k": s.k, "num_bins": nb},
          "mode": mode, "tail": "bucket (tail log-mass as one more bin)",
          "grid": {"first": float(grid_T[0]), "last": float(grid_T[-1]),
                   "spacing": "geometric (the range of temperature.default_grid(mode))"},
          "events": "bench.run.synthetic_events (seeded): top-5 of a softmax over 64 Gaussian "
                    "logits with a lognormal per-event scale + tail; top-1 correct with "
                    "probability p1 ** 1.5",
          "what": {"first_jax": "jax.jit(temperature.search(..., refine=False, grid, "
                                "tail_logmass_N), compiler_options=xla_options.fused_dots) "
                                "on device arrays, as calibrate compiles it: every "
                                "temperature in one lax.scan (ECE + binary NLL + Brier "
                                "each); compiled in the warm-up call; curve and best t "
                                "device_get",
                   "numpy": "bench.run.numpy_ece_curve: Python loop over temperatures, NumPy "
                            "over events in a bins-first [k + 1, N] layout (ECE only: "
                            "first_jax's work is a superset)"},
          "timings": t,
          "speedup_vs_numpy": ratio(t["numpy"]["median_s"], t["first_jax"]["median_s"]),
          "temperatures_per_s": {n_: nt / v["median_s"] for n_, v in t.items()},
          "agreement": {"max_abs_ece_diff": diff, "atol": atol,
                        "best_t": {"first_jax": float(jax_t), "numpy": float(np_t)},
                        "best_t_equal": i_jax == i_np,
                        "best_ece": float(jax_ece[i_jax])}}
