"""Text evaluation: every response token scored, exactly, at a grid of temperatures.

One jitted program per model runs the forward pass, the output head at the scored (response)
positions only, and keeps only scalars there:
the target's logit, the top logit, whether the top-1 token is the target, and the log-partition
log sum_v exp(z_v / t) and log sum_v exp(2 z_v / t) for every temperature t of the grid
(`lax.map` over t: one [B, L, V] buffer at a time). From those, for any grid t and with no
approximation:
  token NLL        lse(z / t) - z_target / t                    (perplexity = exp(mean NLL))
  confidence       exp(z_max / t - lse(z / t))                  (the top-1 token's probability)
  correct          argmax z == target                           (does not depend on t)
  Brier            sum_v p_v^2 - 2 p_target + 1, with sum_v p_v^2 = exp(lse(2z / t) - 2 lse(z / t))
Token-level ECE / MCE / reliability use (confidence, correct) of every scored token; the
post-hoc temperature of a model is the grid t with the lowest validation token NLL.

Choice tasks scored from text rows (`datasets.load_choice_tasks`): a choice's log-likelihood
is the sum of its tokens' log-probs after the prompt; the softmax over an example's choices
gives its prediction and confidence (lm-eval-harness style), at any grid t as well.

Shape letters: B batch, L positions, V vocabulary, T temperatures, M scored tokens, N examples,
R choice rows, C choices.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from first_jax.core import calibration, step
from first_jax import models
from first_jax.engine import infer


def grid(lo: float, hi: float, num: int) -> np.ndarray:
  """Log-spaced temperatures from lo to hi, plus t = 1 (the model as it is)."""
  return np.union1d(np.geomspace(lo, hi, int(num)), [1.0]).astype(np.float32)


def token_scores(params: Any, batch: dict[str, jax.Array], *, apply: step.Apply,
                 t_T: jax.Array) -> dict[str, jax.Array]:
  """Scalars at each row's scored positions `score_pos_BxP` (see the module docstring): the
  output head runs there only (a response is a few of the L positions); lse_BxPxT at each t."""
  h_BxLxD = apply(params, batch["input_ids"], batch["attention_mask"], hidden_only=True)
  pos_BxP = batch["score_pos"]
  h_BxPxD = jnp.take_along_axis(h_BxLxD, pos_BxP[..., None], axis=1)
  logits_BxPxV = apply(params, h_BxPxD, head_only=True).astype(jnp.float32)
  tgt_BxP = jnp.take_along_axis(batch["targets"], pos_BxP, axis=1)
  z_tgt_BxP = jnp.take_along_axis(logits_BxPxV, tgt_BxP[..., None], axis=-1)[..., 0]
  lse_TxBxP = jax.lax.map(lambda t: jax.nn.logsumexp(logits_BxPxV / t, axis=-1), t_T)
  lse2_TxBxP = jax.lax.map(lambda t: jax.nn.logsumexp(2.0 * logits_BxPxV / t, axis=-1), t_T)
  return {"z_target": z_tgt_BxP, "z_max": jnp.max(logits_BxPxV, axis=-1),
          "correct": jnp.argmax(logits_BxPxV, axis=-1) == tgt_BxP,
          "lse": jnp.moveaxis(lse_TxBxP, 0, -1), "lse2": jnp.moveaxis(lse2_TxBxP, 0, -1)}


def scorer(model, t_T: np.ndarray, mesh):
  """The jitted token scoring of `model` at the temperatures t_T."""
  return infer.jit(functools.partial(token_scores, apply=models.apply_fn(model.module),
                                     t_T=jnp.asarray(t_T)), model.params, mesh)


def score(fn, model, arrays: dict, batch_size: int, mesh,
          length_buckets: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """Scores of every scored token of `arrays`, gathered to every process -> flat [M] / [M, T]
  arrays in (row, position) order, with `row` [M] (the token's row, for per-row sums and
  row-level bootstrap)."""
  scored_NxL = arrays["loss_mask"] > 0
  count_N = scored_NxL.sum(-1)
  p = max(1, int(count_N.max()))
  pos_NxP = np.zeros((len(count_N), p), np.int32)  # each row's scored positions, 0-padded
  pos_NxP[np.arange(p)[None, :] < count_N[:, None]] = np.nonzero(scored_NxL)[1]
  rows = {**{k: arrays[k] for k in ("input_ids", "attention_mask", "targets")},
          "score_pos": pos_NxP}
  out = infer.map_rows(fn, model.params, rows, keys=tuple(rows), batch_size=batch_size,
                       mesh=mesh, desc="score tokens", length_buckets=length_buckets,
                       shortest_first=bool(length_buckets))
  at_NxP = np.arange(p)[None, :] < count_N[out["row"]][:, None]  # row-major: (row, position)
  flat = {k: v[at_NxP] for k, v in out.items() if k != "row"}
  flat["row"] = np.broadcast_to(out["row"][:, None], at_NxP.shape)[at_NxP]
  return flat


def token_events(scores: dict, t_T: np.ndarray, j: int) -> dict[str, np.ndarray]:
  """Per-token confidence, correctness, NLL and Brier at grid temperature t_T[j]."""
  t = float(t_T[j])
  lse_M = scores["lse"][:, j].astype(np.float64)
  log_conf_M = scores["z_max"] / t - lse_M
  log_p_tgt_M = scores["z_target"] / t - lse_M
  sum_sq_M = np.exp(scores["lse2"][:, j] - 2.0 * lse_M)
  return {"confidence": np.exp(log_conf_M).astype(np.float32),
          "correct": scores["correct"].astype(np.float32), "nll": -log_p_tgt_M,
          "brier": sum_sq_M - 2.0 * np.exp(log_p_tgt_M) + 1.0, "row": scores["row"]}


def token_metrics(ev: dict[str, np.ndarray], num_bins: tuple[int, ...]) -> dict[str, Any]:
  """Token-level metrics of one model on one text set, from `token_events`."""
  conf_M, correct_M = jnp.asarray(ev["confidence"]), jnp.asarray(ev["correct"])
  nll = float(np.mean(ev["nll"]))
  out: dict[str, Any] = {
      "n": int(len(ev["correct"])), "rows": int(len(np.unique(ev["row"]))),
      "accuracy": float(np.mean(ev["correct"])), "confidence": float(np.mean(ev["confidence"])),
      "nll": nll, "perplexity": float(np.exp(nll)), "brier": float(np.mean(ev["brier"])),
      "brier_top1": float(calibration.binary_brier(conf_M, correct_M))}
  out.update(calibration.summary(conf_M, correct_M, num_bins))
  return out


def fit_post_hoc(scores: dict, t_T: np.ndarray) -> int:
  """Index of the grid temperature with the lowest token NLL on `scores` (validation)."""
  nll_T = [float(np.mean(token_events(scores, t_T, j)["nll"])) for j in range(len(t_T))]
  return int(np.argmin(nll_T))


def choice_events(scores: dict, group_R: np.ndarray, label_N: np.ndarray, t_T: np.ndarray,
                  j: int) -> dict[str, np.ndarray]:
  """Choice-task events at grid temperature t_T[j] from the token scores of its text rows:
  per example the softmax over its choices' log-likelihoods (as `evaluate.events` reads)."""
  lp_tok_M = -token_events(scores, t_T, j)["nll"]
  loglik_R = np.bincount(scores["row"], weights=lp_tok_M, minlength=len(group_R))
  n = len(label_N)
  counts_N = np.bincount(group_R, minlength=n)
  c = int(counts_N.max())
  slot_R = np.arange(len(group_R)) - np.repeat(np.cumsum(counts_N) - counts_N, counts_N)
  ll_NxC = np.full((n, c), -np.inf)
  ll_NxC[group_R, slot_R] = loglik_R
  lp_NxC = ll_NxC - np.logaddexp.reduce(ll_NxC, axis=-1, keepdims=True)
  return {"confidence": np.exp(lp_NxC.max(-1)).astype(np.float32),
          "correct": (lp_NxC.argmax(-1) == label_N).astype(np.float32),
          "logprobs": lp_NxC, "label": np.asarray(label_N)}
