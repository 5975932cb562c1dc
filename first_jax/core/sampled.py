"""Sampled teacher targets: an unbiased sparse estimate of the teacher's full distribution.

Shape letters: V vocabulary, U kept tokens, `x` any leading shape.

A top-k target is a biased estimate of the teacher: the mass outside the k ids is dropped
(renormalise) or pooled into one bin (bucket). Here U distinct tokens are drawn from
p = softmax(logits / t) over the FULL vocabulary by priority sampling (Duffield, Lund & Thorup,
"Priority sampling for estimation of arbitrary subset sums", JACM 2007): token v gets the
priority p_v / u_v with u_v ~ U(0, 1] i.i.d., the U largest priorities are kept, and tau is the
(U+1)-th. The weight of a kept token, w_v = max(p_v, tau) (0 for the others), is an unbiased
estimate of p_v for every v:

    given the other tokens' priorities, let tau' be the U-th largest of them; v is kept iff
    u_v < p_v / tau', and then tau = tau'; so E[w_v | others] = min(1, p_v / tau') * max(p_v,
    tau') = p_v.

Hence sum_v w_v f_v is unbiased for sum_v p_v f_v for any f that does not depend on the draw,
in particular the forward KL's gradient (`losses.sampled_kd`). Tokens with p_v >= tau are kept
with their exact probability: the head of the distribution is exact, its tail is sampled. The
record has a fixed size (U ids, U log-probs, one threshold), which the store needs, and no
count of repeated draws (priority sampling is without replacement). The sampling-with-
replacement estimator (S draws, counts / S; Anshumann et al., ACL 2025) is unbiased too, but
its number of distinct ids varies with the draw.

`priority_sample` returns the kept tokens' EXACT log-probabilities log p_v (the normaliser is
the full-vocabulary log-sum-exp at t, computed in the same program, in >= float32) and log tau;
the weights follow as `log_weights`. Each row's noise is drawn from its own key (the caller
derives it from the example's index: the draw does not depend on the batch, its padding, the
host count or a resume).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from first_jax.core.topk import TAIL_FLOOR, acc_dtype


def priority_sample(logits_xV: jax.Array, num: int, t: float | jax.Array,
                    key_x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`num` distinct tokens of softmax(logits / t) by priority sampling (module docstring).

  Args:
    logits_xV: logits (any float dtype; arithmetic in >= float32).
    num: U, tokens kept per position (static), 1 <= U < V.
    t: temperature (> 0); the distribution sampled is softmax(logits / t) over all of V.
    key_x: one PRNG key per position (typed key array with the leading shape of the logits).
  Returns:
    (logprobs_xU, ids_xU, log_threshold_x): the exact log p of the kept tokens (by decreasing
    priority; TAIL_FLOOR for a token of probability 0), their ids (int32), and log tau
    (TAIL_FLOOR when fewer than U + 1 tokens have a probability above 0).
  """
  vocab = logits_xV.shape[-1]
  if not 1 <= num < vocab:
    raise ValueError(f"priority_sample: expected 1 <= num < vocab={vocab}, got {num}")
  acc = acc_dtype(logits_xV.dtype)
  z_xV = logits_xV.astype(acc) / jnp.asarray(t, acc)
  lse_x = jax.nn.logsumexp(z_xV, axis=-1)
  # -log u for u ~ U(0, 1] is Exp(1): priority in log space = log p + E.
  e_xV = jax.vmap(lambda k: jax.random.exponential(k, (vocab,), acc))(key_x.reshape(-1))
  e_xV = e_xV.reshape(logits_xV.shape)
  pri_xV = z_xV + e_xV  # log priority + lse: the order is that of log p + E
  top_xU1, ids_xU1 = jax.lax.top_k(pri_xV, num + 1)
  # The U kept are the U + 1 largest but their smallest (tau), dropped by a gather whose
  # indices depend on the values: XLA:CPU keeps its cheap TopK only when the sorted outputs
  # are read whole, and a plain slice of them turns it back into a full sort of [.., V]
  # (measured: 15x slower at [4, 64, 49152]); an optimization barrier would do too, but
  # aborts the SPMD partitioner under a split vocabulary (jax 0.10.2).
  top_x = jnp.min(top_xU1, axis=-1)
  last_x = jnp.argmin(top_xU1, axis=-1)
  drop_xU1 = jnp.arange(num + 1) == last_x[..., None]
  keep_xU = jnp.argsort(drop_xU1, axis=-1, stable=True)[..., :num]
  ids_xU = jnp.take_along_axis(ids_xU1, keep_xU, axis=-1)
  at_xU = jnp.take_along_axis(z_xV, ids_xU, axis=-1)
  logprobs_xU = jnp.maximum(at_xU - lse_x[..., None], TAIL_FLOOR)
  log_tau_x = jnp.maximum(top_x - lse_x, TAIL_FLOOR)
  return logprobs_xU, ids_xU.astype(jnp.int32), log_tau_x


def log_weights(logprobs_xU: jax.Array, log_threshold_x: jax.Array) -> jax.Array:
  """log w = log max(p, tau) of each kept token; TAIL_FLOOR (weight 0) for an empty slot (a
  token of probability 0, or a position the store did not keep)."""
  valid_xU = logprobs_xU > 0.5 * TAIL_FLOOR
  w_xU = jnp.maximum(logprobs_xU, log_threshold_x[..., None])
  return jnp.where(valid_xU, w_xU, TAIL_FLOOR)


def position_keys(seed: int | jax.Array, rows_B: jax.Array,
                  positions_BxP: jax.Array) -> jax.Array:
  """[B, P] keys: row r's position j draws from fold_in(fold_in(key(seed), rows_B[r]), j), so
  a token's draw depends on its example and position only (`seed`: an int or a typed key)."""
  base = jax.random.key(seed) if isinstance(seed, int) else seed
  fold = jax.vmap(jax.random.fold_in)
  row_keys_B = fold(jnp.broadcast_to(base, rows_B.shape), rows_B.astype(jnp.uint32))
  return jax.vmap(fold, in_axes=(None, 0))(row_keys_B, positions_BxP.T.astype(jnp.uint32)).T
