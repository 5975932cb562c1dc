"""first_jax.core.sampled and losses.sampled_kd: priority-sampled teacher targets are an
unbiased estimate of the full-vocabulary forward KL and its gradient (float64, many seeded
draws), where top-k targets are not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from first_jax.core import losses, sampled, topk
from first_jax.core.topk import TAIL_FLOOR

V, U, DRAWS = 48, 6, 6000


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _case(seed, t):
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(V,)) * 2.5  # a peaked head and a long tail
  student = rng.normal(size=(V,))
  p = _np_softmax(teacher / t)
  kl = float(np.sum(p * (np.log(p) - np.log(_np_softmax(student)))))
  grad = _np_softmax(student) - p  # d KL / d student logits
  return teacher, student, p, kl, grad


def _draws(teacher, t, num=U, draws=DRAWS, seed=0):
  keys = jax.random.split(jax.random.key(seed), draws)
  lp, ids, log_tau = sampled.priority_sample(jnp.broadcast_to(teacher, (draws, V)), num, t,
                                             keys)
  return lp, ids, log_tau


def _loss_and_grad(student, ids_NxU, lp_NxU, log_tau_N):
  def one(s_V, ids_U, lp_U, log_tau):
    total, _ = losses.sampled_kd(s_V[None, None], ids_U[None, None], lp_U[None, None],
                                 log_tau[None, None], jnp.ones((1, 1)))
    return total
  return jax.vmap(jax.value_and_grad(one), in_axes=(None, 0, 0, 0))(student, ids_NxU, lp_NxU,
                                                                   log_tau_N)


def _tolerance(samples_NxD, p_D, tau_N, z=4.5):
  """z Monte-Carlo standard errors of each coordinate's mean. A token rarer than 1 / N may be
  kept in none of the N draws (empirical error 0): its error is then bounded below by the
  estimator's own variance, E[w_v^2] - p_v^2 = p_v E[max(p_v, tau')] - p_v^2 (w_v = max(p_v,
  tau') with probability min(1, p_v / tau'); tau' estimated by the draws' tau)."""
  x = np.asarray(samples_NxD, np.float64)
  var_emp = x.var(0, ddof=1)
  var_est = p_D * np.maximum(p_D[None], np.asarray(tau_N)[:, None]).mean(0) - p_D**2
  return z * np.sqrt(np.maximum(var_emp, var_est) / len(x)) + 1e-12


def _sample_and_grads(teacher, student, t, seed=0):
  lp, ids, log_tau = _draws(jnp.asarray(teacher), t, seed=seed)
  loss_N, grad_NxV = _loss_and_grad(jnp.asarray(student), ids, lp, log_tau)
  return lp, ids, log_tau, np.asarray(loss_N), np.asarray(grad_NxV)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_priority_sample_is_unbiased_for_the_full_kd_loss_and_gradient_float64(t):
  with jax.enable_x64(True):
    teacher, student, p, kl, grad = _case(0, t)
    lp, ids, log_tau, loss_N, grad_NxV = _sample_and_grads(teacher, student, t)
    assert lp.dtype == jnp.float64
    tau_N = np.exp(np.asarray(log_tau))
    # the kept tokens are distinct, with their exact log-probabilities
    ids_np = np.asarray(ids)
    assert all(len(set(r)) == U for r in ids_np)
    np.testing.assert_allclose(np.asarray(lp), np.log(p)[ids_np], rtol=0, atol=1e-12)
    # the weights: E[w_v] = p_v for every token v of the vocabulary
    w = np.exp(np.asarray(sampled.log_weights(lp, log_tau)))
    w_NxV = np.zeros((DRAWS, V))
    np.put_along_axis(w_NxV, ids_np, w, axis=1)
    bad = np.abs(w_NxV.mean(0) - p) > _tolerance(w_NxV, p, tau_N)
    assert not bad.any(), np.nonzero(bad)
    assert ((w_NxV > 0).mean(0) < 1).sum() > V // 2  # really sampled: most tokens not always kept
    # the loss and its gradient: unbiased for KL(p || q) and d KL / d student logits
    assert abs(loss_N.mean() - kl) <= 4.5 * loss_N.std(ddof=1) / np.sqrt(DRAWS)
    bad = np.abs(grad_NxV.mean(0) - grad) > _tolerance(grad_NxV, p, tau_N)
    assert not bad.any(), np.nonzero(bad)


def test_the_same_check_fails_for_top_k_targets_float64():
  """The test above has the power to fail: the gradient from top-k targets (bucket or
  renormalised, at the same U tokens) lies outside the sampled estimate's Monte-Carlo error."""
  with jax.enable_x64(True):
    t = 1.0
    teacher, student, p, kl, grad = _case(0, t)
    _, _, log_tau, _, grad_NxV = _sample_and_grads(teacher, student, t)
    tol = _tolerance(grad_NxV, p, np.exp(np.asarray(log_tau)))
    lp, ids, tail = topk.extract(jnp.asarray(teacher)[None, None], U)
    for tail_mode in ("bucket", "renormalize"):
      g = jax.grad(lambda s: losses.topk_kd(s[None, None], ids, lp, jnp.ones((1, 1)),
                                            tail=tail_mode, teacher_tail_logmass_BxL=tail)[0])(
                                                jnp.asarray(student))
      assert (np.abs(np.asarray(g) - grad) > tol).any(), tail_mode


def test_the_head_is_kept_exactly_and_the_threshold_is_below_it():
  """Tokens whose probability is above tau are kept with weight p (no sampling error)."""
  with jax.enable_x64(True):
    teacher = np.full(V, -30.0)
    teacher[:3] = [5.0, 4.0, 3.0]  # three tokens hold nearly all the mass
    lp, ids, log_tau = _draws(jnp.asarray(teacher), 1.0, draws=200, seed=1)
    assert (np.sort(np.asarray(ids)[:, :3], axis=1) == [0, 1, 2]).all()
    w = np.exp(np.asarray(sampled.log_weights(lp, log_tau)))
    np.testing.assert_allclose(w[:, :3].sum(1), _np_softmax(teacher)[:3].sum(), rtol=1e-12)


def test_draws_are_reproducible_and_depend_on_the_key_only():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 3, V)), jnp.float32)
  keys = sampled.position_keys(7, jnp.array([11, 12]), jnp.arange(3)[None].repeat(2, 0))
  a = sampled.priority_sample(logits, U, 1.5, keys)
  b = sampled.priority_sample(logits, U, 1.5, keys)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # row 12 alone, at its position 2, draws what it drew in the batch
  one = sampled.priority_sample(logits[1:, 2:], U, 1.5,
                                sampled.position_keys(7, jnp.array([12]), jnp.array([[2]])))
  np.testing.assert_array_equal(np.asarray(one[1])[0, 0], np.asarray(a[1])[1, 2])
  other = sampled.priority_sample(logits, U, 1.5, sampled.position_keys(
      8, jnp.array([11, 12]), jnp.arange(3)[None].repeat(2, 0)))
  assert not np.array_equal(np.asarray(other[1]), np.asarray(a[1]))


def test_sampled_kd_bf16_logits_and_empty_slots():
  """bf16 student logits reduce in float32; empty slots (TAIL_FLOOR) and masked positions add
  nothing, whatever their ids and thresholds."""
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(2, 4, V)), jnp.bfloat16)
  t = jnp.asarray(rng.normal(size=(2, 4, V)) * 2, jnp.float32)
  keys = sampled.position_keys(0, jnp.arange(2), jnp.arange(4)[None].repeat(2, 0))
  lp, ids, log_tau = sampled.priority_sample(t, U, 1.0, keys)
  mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1]], jnp.float32)
  total, count = losses.sampled_kd(s, ids, lp, log_tau, mask)
  assert total.dtype == jnp.float32 and float(count) == 6.0
  lp_pad = jnp.concatenate([lp, jnp.full(lp.shape[:-1] + (2,), TAIL_FLOOR)], -1)
  ids_pad = jnp.concatenate([ids, jnp.zeros(ids.shape[:-1] + (2,), jnp.int32)], -1)
  junk = jnp.where(mask[..., None] > 0, lp_pad, 0.0)  # masked: any finite values
  total2, _ = losses.sampled_kd(s, ids_pad, junk, jnp.where(mask > 0, log_tau, 3.0), mask)
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)
  ref, _ = losses.sampled_kd(s.astype(jnp.float32), ids, lp, log_tau, mask)
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)
