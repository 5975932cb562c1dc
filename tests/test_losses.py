"""first_jax.core.losses against float64 NumPy; gradients vs finite differences; compiled memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from first_jax.runtime import xla_options
from first_jax.runtime.errors import UserError
from first_jax.core import losses, temperature, topk

FLOOR = topk.TAIL_FLOOR
_extract = jax.jit(topk.extract, static_argnums=1)
_rescale = jax.jit(functools.partial(temperature.rescale, mode="log_space"))


def _lse(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return (np.log(np.exp(x - m).sum(axis, keepdims=True)) + m).squeeze(axis)


def _div(p, q, direction, beta):
  if direction == "forward":
    return (np.exp(p) * (p - q)).sum(-1)
  if direction == "reverse":
    return (np.exp(q) * (q - p)).sum(-1)
  m = np.logaddexp(p + np.log(beta), q + np.log(1 - beta))
  return beta * (np.exp(p) * (p - m)).sum(-1) + (1 - beta) * (np.exp(q) * (q - m)).sum(-1)


def _ref_topk_kd(s, ids, t_lp, mask, tail, direction, t_tail=None, beta=0.5):
  s = np.asarray(s, np.float64)
  t_lp = np.clip(np.asarray(t_lp, np.float64), FLOOR, 0)
  s_at = np.take_along_axis(s, ids, -1)
  if tail == "renormalize":
    p = t_lp - _lse(t_lp)[..., None]
    q = s_at - _lse(s_at)[..., None]
  else:
    lse = _lse(s)
    if t_tail is None:
      rest = 1 - np.exp(t_lp).sum(-1)
      t_tail = np.where(rest > 0, np.log(np.maximum(rest, 1e-300)), FLOOR)
    in_ids = np.zeros(s.shape, bool)
    np.put_along_axis(in_ids, ids, True, -1)
    q_tail = np.log(np.where(in_ids, 0, np.exp(s - lse[..., None])).sum(-1))
    p = np.concatenate([t_lp, np.clip(t_tail, FLOOR, 0)[..., None]], -1)
    q = np.concatenate([s_at - lse[..., None], q_tail[..., None]], -1)
  d = _div(p, q, direction, beta)
  return (np.where(mask > 0, d * mask, 0)).sum(), mask.sum()


def _batch(rng, shape, k, dtype):
  """Student logits, a teacher (top-k of other logits, log-space rescaled), mask w/ empty row."""
  s = (rng.normal(size=shape) * 2).astype(np.float32)
  t_logits = jnp.asarray(s + rng.normal(size=shape).astype(np.float32), dtype)
  lp, ids, tail = _extract(t_logits, k)
  lp_Kp1 = _rescale(lp, 1.3, tail_logmass_x=tail)
  lp, tail = lp_Kp1[..., :-1], lp_Kp1[..., -1]
  mask = (rng.uniform(size=shape[:2]) > 0.3).astype(np.float32)
  mask[0] = 0.0
  s_in = jnp.asarray(s, dtype)
  return s_in, np.asarray(s_in.astype(jnp.float32)), np.asarray(ids), np.asarray(lp), \
      np.asarray(tail), mask


@pytest.mark.parametrize("tail,direction", [("bucket", "forward"), ("bucket", "reverse"),
                                            ("bucket", "jsd"), ("renormalize", "forward"),
                                            ("renormalize", "reverse"), ("renormalize", "jsd")])
@pytest.mark.parametrize("k,shape,dtype", [(1, (2, 3, 50), jnp.float32),
                                           (5, (3, 4, 300), jnp.bfloat16),
                                           (20, (2, 5, 64), jnp.float32)])
def test_topk_kd_matches_numpy(tail, direction, k, shape, dtype):
  rng = np.random.default_rng(k * 7 + len(direction))
  s_in, s_np, ids, lp, t_tail, mask = _batch(rng, shape, k, dtype)
  f = jax.jit(functools.partial(losses.topk_kd, tail=tail, direction=direction, beta=0.3))
  for given_tail in (t_tail, None):
    got = f(s_in, ids, lp, mask, teacher_tail_logmass_BxL=given_tail)
    want = _ref_topk_kd(s_np, ids, lp, mask, tail, direction, given_tail, beta=0.3)
    assert got[0].dtype == jnp.float32
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5, atol=1e-6)
    assert float(got[1]) == want[1]


def test_vocab_chunks_give_the_same_loss_and_grad():
  rng = np.random.default_rng(11)
  s_in, _, ids, lp, t_tail, mask = _batch(rng, (2, 3, 50), 5, jnp.float32)

  def run(chunk):
    f = lambda s: losses.topk_kd(s, ids, lp, mask, teacher_tail_logmass_BxL=t_tail,
                                 vocab_chunk=chunk)[0]
    return jax.jit(jax.value_and_grad(f))(s_in)

  (l0, g0), (l1, g1), (l2, g2) = run(None), run(7), run(16)  # 7, 16 do not divide 50
  np.testing.assert_allclose([float(l1), float(l2)], float(l0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=1e-7)
  np.testing.assert_allclose(np.asarray(g2), np.asarray(g0), atol=1e-7)
  ce = [float(losses.cross_entropy(s_in, ids[..., 0], mask, vocab_chunk=c)[0])
        for c in (None, 7)]
  np.testing.assert_allclose(ce[1], ce[0], rtol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_bucket_kd_is_zero_with_zero_grad_when_student_is_teacher(direction):
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 6, 80)) * 3, jnp.float32)
  lp, ids, tail = _extract(logits, 5)
  mask = jnp.ones((2, 6))
  for t_tail in (tail, None):
    f = lambda s: losses.topk_kd(s, ids, lp, mask, direction=direction,
                                 teacher_tail_logmass_BxL=t_tail)[0]
    vg = jax.jit(jax.value_and_grad(f))
    loss, grad = vg(logits)
    assert abs(float(loss)) < 1e-5
    assert float(jnp.max(jnp.abs(grad))) < 1e-6
    # and a different student is penalised, with a non-zero gradient
    loss2, grad2 = vg(logits + jnp.asarray(rng.normal(size=logits.shape), jnp.float32))
    assert float(loss2) > 1e-2 and float(jnp.max(jnp.abs(grad2))) > 1e-3


def test_renormalized_kd_is_zero_when_renormalized_distributions_match():
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(2, 4, 60)) * 2, jnp.float32)
  ids = jnp.asarray(np.argsort(rng.uniform(size=(2, 4, 60)), -1)[..., :5], jnp.int32)
  # teacher: the student's log-probs at random ids (not renormalised), shifted per position
  lp = jnp.take_along_axis(jax.nn.log_softmax(s), ids, -1) - 0.4
  f = lambda x: losses.topk_kd(x, ids, lp, jnp.ones((2, 4)), tail="renormalize")[0]
  loss, grad = jax.jit(jax.value_and_grad(f))(s)
  assert abs(float(loss)) < 1e-6 and float(jnp.max(jnp.abs(grad))) < 1e-6
  assert float(jax.jit(losses.topk_kd)(s, ids, lp, jnp.ones((2, 4)))[0]) > 1e-2


def _ref_full_kd(s, t, mask, temp, scale):
  p = t / temp - _lse(t / temp)[..., None]
  q = s / temp - _lse(s / temp)[..., None]
  kl = (np.exp(p) * (p - q)).sum(-1) * (temp ** 2 if scale else 1)
  return (kl * mask).sum(), mask.sum()


def _ref_ce(s, y, mask, eps):
  lp = s - _lse(s)[..., None]
  nll = -np.take_along_axis(lp, np.clip(y, 0, s.shape[-1] - 1)[..., None], -1)[..., 0]
  loss = (1 - eps) * nll - eps * lp.mean(-1)
  return np.where(mask > 0, loss * mask, 0).sum(), mask.sum()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_full_kd_and_cross_entropy_match_numpy(dtype):
  rng = np.random.default_rng(4)
  s_in = jnp.asarray(rng.normal(size=(3, 5, 70)) * 2, dtype)
  t_in = jnp.asarray(rng.normal(size=(3, 5, 70)) * 2, dtype)
  s, t = (np.asarray(a.astype(jnp.float32), np.float64) for a in (s_in, t_in))
  mask = (rng.uniform(size=(3, 5)) > 0.3).astype(np.float32)
  mask[1] = 0.0
  for temp, scale in ((1.0, True), (2.5, True), (2.5, False)):
    got = jax.jit(functools.partial(losses.full_kd, temperature=temp, scale_by_t2=scale))(
        s_in, t_in, mask)
    np.testing.assert_allclose(float(got[0]), _ref_full_kd(s, t, mask, temp, scale)[0],
                               rtol=1e-5)
  y = rng.integers(0, 70, size=(3, 5))
  y[1] = -100  # masked row: any id
  for eps in (0.0, 0.1):
    got = jax.jit(functools.partial(losses.cross_entropy, label_smoothing=eps))(s_in, y, mask)
    want = _ref_ce(s, y, mask, eps)
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)
    assert float(got[1]) == want[1]


def test_cross_entropy_smoothed_over_choice_ids_matches_numpy():
  """Label smoothing whose uniform is over the given ids (the answer letters), -1 = padding."""
  rng = np.random.default_rng(14)
  s_in = jnp.asarray(rng.normal(size=(4, 3, 50)) * 2, jnp.float32)
  s = np.asarray(s_in, np.float64)
  mask = (rng.uniform(size=(4, 3)) > 0.3).astype(np.float32)
  y = rng.integers(0, 50, size=(4, 3))
  ids = np.stack([rng.permutation(50)[:4] for _ in range(12)]).reshape(4, 3, 4).astype(np.int32)
  ids[0, :, 3] = -1
  eps = 0.2
  got = jax.jit(functools.partial(losses.cross_entropy, label_smoothing=eps))(
      s_in, y, mask, smoothing_ids_BxLxC=ids)
  lp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(
      -1, keepdims=True)
  want = 0.0
  for b in range(4):
    for t in range(3):
      valid = ids[b, t][ids[b, t] >= 0]
      nll = -lp[b, t, y[b, t]]
      smooth = -lp[b, t, valid].mean()
      want += mask[b, t] * ((1 - eps) * nll + eps * smooth)
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
  vocab = losses.cross_entropy(s_in, y, mask, label_smoothing=eps)[0]
  assert abs(float(vocab) - want) > 1e-3  # a different target than the vocabulary-wide one


def test_gradients_match_finite_differences_float64():
  """Directional derivatives along a random direction: reverse-mode vs central differences."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    s = jnp.asarray(rng.normal(size=(2, 3, 40)) * 2, jnp.float64)
    t = jnp.asarray(rng.normal(size=(2, 3, 40)) * 2, jnp.float64)
    lp, ids, tail = topk.extract(t, 5)
    assert lp.dtype == jnp.float64  # x64 really on inside the context
    mask = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    y = jnp.asarray(rng.integers(0, 40, size=(2, 3)))

    def all_losses(x):  # every loss and option at once: one compile for the Jacobian
      out = [losses.topk_kd(x, ids, lp, mask, tail=tm, direction=d, teacher_tail_logmass_BxL=tl,
                            vocab_chunk=c)[0]
             for tm in losses.TAILS for d in losses.DIRECTIONS for tl, c in ((tail, None),
                                                                            (None, 7))]
      out.append(losses.full_kd(x, t, mask, temperature=2.0)[0])
      out.append(losses.cross_entropy(x, y, mask, label_smoothing=0.1, vocab_chunk=9)[0])
      return jnp.stack(out)

    d = jnp.asarray(rng.normal(size=s.shape))
    jac = jax.jit(jax.jacrev(all_losses))(s)
    f = jax.jit(all_losses)
    h = 1e-5
    fd = (f(s + h * d) - f(s - h * d)) / (2 * h)
    analytic = jnp.tensordot(jac, d, axes=3)
    assert float(jnp.min(jnp.abs(analytic))) > 1e-3  # every loss has a non-trivial slope here
    np.testing.assert_allclose(np.asarray(analytic), np.asarray(fd), rtol=1e-6)
  assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak


def test_bfloat16_gradient_matches_float32():
  rng = np.random.default_rng(6)
  s_bf = jnp.asarray(rng.normal(size=(2, 4, 64)) * 2, jnp.bfloat16)
  lp, ids, tail = _extract(jnp.asarray(rng.normal(size=(2, 4, 64)) * 2, jnp.float32), 5)
  mask = jnp.ones((2, 4))
  f = lambda x: losses.topk_kd(x, ids, lp, mask, teacher_tail_logmass_BxL=tail)[0]
  g = jax.jit(jax.grad(f))
  g_bf, g_32 = g(s_bf), g(s_bf.astype(jnp.float32))
  assert g_bf.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(g_32)))
  assert scale > 1e-2  # the gather path contributes (it once silently did not)
  np.testing.assert_allclose(np.asarray(g_bf.astype(jnp.float32)), np.asarray(g_32),
                             atol=1e-2 * scale)


def test_empty_mask_and_bad_arguments():
  rng = np.random.default_rng(7)
  s_in, _, ids, lp, t_tail, _ = _batch(rng, (2, 3, 30), 5, jnp.float32)
  zero = jnp.zeros((2, 3))
  assert [float(v) for v in jax.jit(losses.topk_kd)(s_in, ids, lp, zero)] == [0.0, 0.0]
  # garbage teacher values at masked positions do not leak
  bad_lp = np.where(np.arange(3)[None, :, None] == 0, -np.inf, lp)
  mask = jnp.asarray([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  loss, grad = jax.jit(jax.value_and_grad(lambda x: losses.topk_kd(x, ids, bad_lp, mask)[0]))(
      s_in)
  assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(UserError, match="tail"):
    losses.topk_kd(s_in, ids, lp, zero, tail="linear")
  with pytest.raises(UserError, match="beta"):
    losses.topk_kd(s_in, ids, lp, zero, direction="jsd", beta=1.0)


B, L, V, K = 2, 512, 151936, 5
F32_BLV_QUARTER = B * L * V * 4 // 4  # 155.6 MB


def _compiled(fn, dtype, grad=False, options=None):
  args = (jax.ShapeDtypeStruct((B, L, V), dtype), jax.ShapeDtypeStruct((B, L, K), jnp.int32),
          jax.ShapeDtypeStruct((B, L, K), jnp.float32), jax.ShapeDtypeStruct((B, L), jnp.float32))
  target = jax.grad(lambda *a: fn(*a)[0]) if grad else fn
  return jax.jit(target, compiler_options=options).lower(*args).compile().memory_analysis()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_topk_kd_compiled_temp_memory_is_small(dtype):
  mem = _compiled(losses.topk_kd, dtype)
  print(f"\ntopk_kd {jnp.dtype(dtype).name} B={B} L={L} V={V}: forward temp "
        f"{mem.temp_size_in_bytes / 1e6:.2f} MB (limit {F32_BLV_QUARTER / 1e6:.1f} MB)")
  assert mem.temp_size_in_bytes < F32_BLV_QUARTER
  if dtype == jnp.float32:  # the chunked path is bounded by the chunk whatever the compiler
    chunked = _compiled(functools.partial(losses.topk_kd, vocab_chunk=8192), dtype)
    assert chunked.temp_size_in_bytes < B * L * 8192 * 4 * 1.1
    grad = _compiled(losses.topk_kd, dtype, grad=True)
    print(f"grad temp {grad.temp_size_in_bytes / 1e6:.2f} MB "
          f"(+ the [B, L, V] gradient itself, {grad.output_size_in_bytes / 1e6:.1f} MB)")
    assert grad.temp_size_in_bytes < F32_BLV_QUARTER


def test_topk_kd_gradient_memory_stays_small_under_the_train_steps_cpu_options():
  """The train step compiles with `xla_options.fused_dots` on CPU: the KD loss's gradient keeps
  its bound there too (its forward alone would not: a V-wide exp is materialised, which is why
  forward-only programs do not take the options)."""
  options = xla_options.fused_dots("cpu")
  grad = _compiled(losses.topk_kd, jnp.float32, grad=True, options=options)
  assert grad.temp_size_in_bytes < F32_BLV_QUARTER
