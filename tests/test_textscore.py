"""Text scoring: every metric at every grid temperature against float64 NumPy references."""
import functools

import jax
import numpy as np

from first_jax.runtime import sharding
from first_jax.engine import textscore

MESH1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _logsumexp(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


class _Model:  # what `textscore.score` reads: params and a forward pass
  def __init__(self, logits_NxLxV):
    self.params = {"logits": logits_NxLxV}


def _fake_scorer(t_T):
  """A "model" whose hidden state at (row, position) is its row of logits (the head is the
  identity), the row found from the id in column 0."""
  def apply(params, x, mask_BxL=None, *, hidden_only=False, head_only=False):
    if head_only:
      return x
    assert hidden_only
    return params["logits"][x[:, 0]][:, :x.shape[1]]
  return jax.jit(functools.partial(textscore.token_scores, apply=apply, t_T=t_T))


def _data(seed=0, n=7, length=12, vocab=50):
  rng = np.random.default_rng(seed)
  logits_NxLxV = rng.normal(0, 3, (n, length, vocab)).astype(np.float32)
  ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
  ids[:, 0] = np.arange(n)  # lets the fake model find its row after shuffling / trimming
  lengths = rng.integers(4, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  targets = rng.integers(0, vocab, (n, length)).astype(np.int32)
  loss = np.zeros((n, length), np.float32)
  for i, l in enumerate(lengths):  # a response of 1..3 tokens at the end of each row
    loss[i, l - 2 - rng.integers(0, 3):l - 1] = 1.0
  arrays = {"input_ids": ids, "attention_mask": mask, "targets": targets, "loss_mask": loss,
            "example_id": np.arange(n)}
  return logits_NxLxV, arrays


def test_token_scores_equal_float64_reference_at_every_temperature():
  logits_NxLxV, arrays = _data()
  t_T = textscore.grid(0.5, 2.0, 5)
  assert 1.0 in t_T
  scores = textscore.score(_fake_scorer(t_T), _Model(logits_NxLxV), arrays, batch_size=3,
                           mesh=MESH1, length_buckets=(8, 12))
  at = arrays["loss_mask"] > 0
  rows, pos = np.nonzero(at)
  np.testing.assert_array_equal(scores["row"], rows)
  z = logits_NxLxV[rows, pos].astype(np.float64)
  tgt = arrays["targets"][rows, pos]
  for j, t in enumerate(t_T.astype(np.float64)):
    lp = z / t - _logsumexp(z / t)[:, None]
    p = np.exp(lp)
    ev = textscore.token_events(scores, t_T, j)
    np.testing.assert_allclose(ev["nll"], -lp[np.arange(len(tgt)), tgt], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ev["confidence"], p.max(-1), rtol=1e-4, atol=1e-6)
    onehot = np.eye(z.shape[-1])[tgt]
    np.testing.assert_allclose(ev["brier"], ((p - onehot) ** 2).sum(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ev["correct"], (z.argmax(-1) == tgt).astype(np.float32))


def test_token_metrics_and_post_hoc_fit():
  logits_NxLxV, arrays = _data(seed=1, n=40, length=10)
  # An over-confident model: the target is the top-1 only about half the time, but sharp.
  t_T = textscore.grid(0.25, 4.0, 17)
  scores = textscore.score(_fake_scorer(t_T), _Model(logits_NxLxV * 3), arrays, batch_size=8,
                           mesh=MESH1)
  j1 = int(np.flatnonzero(t_T == 1.0)[0])
  m = textscore.token_metrics(textscore.token_events(scores, t_T, j1), (10, 15))
  assert m["n"] == int((arrays["loss_mask"] > 0).sum()) and m["rows"] == 40
  assert np.isclose(m["perplexity"], np.exp(m["nll"]))
  assert sum(m["reliability"]["count"]) == m["n"]
  best = textscore.fit_post_hoc(scores, t_T)
  nll_T = [np.mean(textscore.token_events(scores, t_T, j)["nll"]) for j in range(len(t_T))]
  assert best == int(np.argmin(nll_T)) and t_T[best] > 1.0  # random targets: soften


def test_choice_events_are_the_softmax_over_choice_loglikelihoods():
  logits_NxLxV, arrays = _data(seed=2, n=7)
  group_R = np.array([0, 0, 0, 1, 1, 2, 2])  # 3 examples with 3, 2, 2 choices
  label_N = np.array([2, 0, 1])
  t_T = textscore.grid(0.5, 2.0, 3)
  scores = textscore.score(_fake_scorer(t_T), _Model(logits_NxLxV), arrays, batch_size=4,
                           mesh=MESH1)
  j = 1
  lp_tok = -textscore.token_events(scores, t_T, j)["nll"]
  ll_R = np.array([lp_tok[scores["row"] == r].sum() for r in range(7)])
  ev = textscore.choice_events(scores, group_R, label_N, t_T, j)
  for i, rows in enumerate(([0, 1, 2], [3, 4], [5, 6])):
    lp = ll_R[rows] - _logsumexp(ll_R[rows])
    np.testing.assert_allclose(ev["logprobs"][i, :len(rows)], lp, rtol=1e-6)
    assert np.isclose(ev["confidence"][i], np.exp(lp.max()), rtol=1e-5)
    assert ev["correct"][i] == float(np.argmax(lp) == label_N[i])
  assert np.isneginf(ev["logprobs"][1, 2])
