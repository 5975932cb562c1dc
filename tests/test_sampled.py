"""first_jax.core.sampled and losses.sampled_kd: priority-sampled teacher targets are an
unbiased estimate of the full-vocabulary forward KL and its gradient (float64, many seeded
draws), where top-k targets are not."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from first_jax import models
from first_jax.core import losses, sampled, step, topk
from first_jax.core.topk import TAIL_FLOOR
from first_jax.data import store
from first_jax.engine import infer
from first_jax.runtime import sharding
from first_jax.runtime.errors import UserError
from tests.conftest import SMOKE
from tests.test_step import B as SB, L as SL, make_batch, tiny

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


@functools.partial(jax.jit, static_argnames=("num", "draws"))
def _draws_jit(teacher, t, seed, num, draws):
  keys = jax.random.split(jax.random.key(seed), draws)
  return sampled.priority_sample(jnp.broadcast_to(teacher, (draws, V)), num, t, keys)


_sample = jax.jit(sampled.priority_sample, static_argnums=1)  # one compile per shape
_sampled_kd = jax.jit(losses.sampled_kd)


def _draws(teacher, t, num=U, draws=DRAWS, seed=0):
  return _draws_jit(teacher, t, seed, num=num, draws=draws)


@jax.jit
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
      g = jax.jit(jax.grad(lambda s: losses.topk_kd(
          s[None, None], ids, lp, jnp.ones((1, 1)), tail=tail_mode,
          teacher_tail_logmass_BxL=tail)[0]))(jnp.asarray(student))
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
  a = _sample(logits, U, 1.5, keys)
  b = _sample(logits, U, 1.5, keys)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # row 12 alone, at its position 2, draws what it drew in the batch
  one = _sample(logits[1:, 2:], U, 1.5,
                                sampled.position_keys(7, jnp.array([12]), jnp.array([[2]])))
  np.testing.assert_array_equal(np.asarray(one[1])[0, 0], np.asarray(a[1])[1, 2])
  other = _sample(logits, U, 1.5, sampled.position_keys(
      8, jnp.array([11, 12]), jnp.arange(3)[None].repeat(2, 0)))
  assert not np.array_equal(np.asarray(other[1]), np.asarray(a[1]))


def test_sampled_kd_bf16_logits_and_empty_slots():
  """bf16 student logits reduce in float32; empty slots (TAIL_FLOOR) and masked positions add
  nothing, whatever their ids and thresholds."""
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(2, 4, V)), jnp.bfloat16)
  t = jnp.asarray(rng.normal(size=(2, 4, V)) * 2, jnp.float32)
  keys = sampled.position_keys(0, jnp.arange(2), jnp.arange(4)[None].repeat(2, 0))
  lp, ids, log_tau = _sample(t, U, 1.0, keys)
  mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1]], jnp.float32)
  total, count = _sampled_kd(s, ids, lp, log_tau, mask)
  assert total.dtype == jnp.float32 and float(count) == 6.0
  lp_pad = jnp.concatenate([lp, jnp.full(lp.shape[:-1] + (2,), TAIL_FLOOR)], -1)
  ids_pad = jnp.concatenate([ids, jnp.zeros(ids.shape[:-1] + (2,), jnp.int32)], -1)
  junk = jnp.where(mask[..., None] > 0, lp_pad, 0.0)  # masked: any finite values
  total2, _ = _sampled_kd(s, ids_pad, junk, jnp.where(mask > 0, log_tau, 3.0), mask)
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)
  ref, _ = _sampled_kd(s.astype(jnp.float32), ids, lp, log_tau, mask)
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-5)


# ---- extraction, the online step and the store ------------------------------------------------

@pytest.mark.slow
def test_a_position_draws_the_same_whatever_its_batch_and_mode():
  """Sampled extraction keys each position by (seed, example, position): a row alone, or only
  its answer position (answer-only), draws what it drew in the full batch."""
  teacher, batch = tiny(12, layers=2), make_batch(13)
  batch["example_id"] = np.array([40, 41, 42, 43], np.int32)
  apply = models.apply_fn(teacher.module)
  full = infer.teacher_sample(teacher.params, batch, apply=apply, num=U, t=1.7, seed=5)
  assert full["teacher_ids"].shape == (SB, SL, U)
  alone = infer.teacher_sample(teacher.params, {k: v[2:3] for k, v in batch.items()},
                               apply=apply, num=U, t=1.7, seed=5)
  np.testing.assert_array_equal(np.asarray(alone["teacher_ids"])[0],
                                np.asarray(full["teacher_ids"])[2])
  sparse = infer.teacher_sample(teacher.params, batch, apply=apply, num=U, t=1.7, seed=5,
                                answer_only=True)
  rows, pos = np.arange(SB), batch["answer_pos"]
  np.testing.assert_array_equal(np.asarray(sparse["teacher_ids"])[rows, pos],
                                np.asarray(full["teacher_ids"])[rows, pos])
  np.testing.assert_allclose(np.asarray(sparse["teacher_logprobs"])[rows, pos],
                             np.asarray(full["teacher_logprobs"])[rows, pos], atol=2e-5)
  other = infer.teacher_sample(teacher.params, batch, apply=apply, num=U, t=1.7, seed=6)
  assert not np.array_equal(np.asarray(other["teacher_ids"]), np.asarray(full["teacher_ids"]))


def test_vocab_parallel_draws_equal_one_device():
  """Logits split over the vocabulary on 8 devices: the same draw, ids bit-identical."""
  mesh = sharding.make_mesh(1, 1, 8)
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 3, 64)) * 3, jnp.float32)
  keys = sampled.position_keys(1, jnp.array([3, 9]), jnp.arange(3)[None].repeat(2, 0))
  fn = jax.jit(lambda x, k: sampled.priority_sample(x, U, 1.3, k))
  one = fn(logits, keys)
  split = fn(jax.device_put(logits, NamedSharding(mesh, P(None, None, "tensor"))), keys)
  np.testing.assert_array_equal(np.asarray(split[1]), np.asarray(one[1]))
  for a, b in ((split[0], one[0]), (split[2], one[2])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_online_sampled_step_equals_offline_targets_of_the_same_draw():
  """The online step draws per (seed, step, row, position); the same draw given as offline
  targets gives the same loss; the step trains (finite, decreasing loss on a fixed batch)."""
  student, teacher, batch = tiny(3), tiny(4, layers=2), make_batch(5)
  apply_s, apply_t = models.apply_fn(student.module), models.apply_fn(teacher.module)
  tx = step.make_optimizer(lr=3e-3, total_steps=20, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(student.params, tx, initial_temperature=1.5)
  spec = step.LossSpec(kind="sampled_kd", online=True, samples=U, sample_seed=2,
                       temperature_mode="log_space", answer_only=True)
  loss_on, _ = step.loss_fn(student.params, state, batch, teacher.params, student_apply=apply_s,
                            teacher_apply=apply_t, spec=spec)
  keys = sampled.position_keys(jax.random.fold_in(jax.random.key(2), 0), jnp.arange(SB),
                               step.sample_positions(batch, spec))
  t_logits = step.student_logits(teacher.params, batch, apply_t, spec)
  targets = step.teacher_sampled(t_logits, U, jnp.float32(1.5), keys)
  offline = {**batch, **infer.at_answer_positions(targets, batch)}
  loss_off, _ = step.loss_fn(student.params, state, offline, None, student_apply=apply_s,
                             teacher_apply=None,
                             spec=step.LossSpec(kind="sampled_kd", samples=U, answer_only=True))
  np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=1e-6)
  fn = jax.jit(functools.partial(step.train_step, student_apply=apply_s, teacher_apply=apply_t,
                                 spec=spec, tx=tx))
  history = []
  for _ in range(20):
    state, m = fn(state, batch, teacher.params)
    history.append(float(m["loss"][0] / m["loss"][1]))
  assert np.isfinite(history).all() and np.mean(history[-5:]) < np.mean(history[:5]), history


def test_a_sampled_store_round_trips_and_refuses_another_draw(tmp_path):
  rng = np.random.default_rng(6)
  n, l, vocab = 5, 7, 300
  logits = jnp.asarray(rng.normal(size=(n, l, vocab)) * 2, jnp.float32)
  keys = sampled.position_keys(0, jnp.arange(n), jnp.arange(l)[None].repeat(n, 0))
  lp, ids, log_tau = (np.asarray(x) for x in _sample(logits, U, 2.0, keys))
  mask = rng.random((n, l)) < 0.6
  draw = {"sampler": "priority", "temperature": 2.0, "mode": "log_space", "seed": 0}
  spec = store.StoreSpec(k=U, vocab_size=vocab, seq_len=l, sampling=draw)
  w = store.StoreWriter(tmp_path, spec)
  w.write_shard(0, np.arange(n), rng.integers(0, vocab, (n, l)), ids, lp, log_tau, mask)
  w.finalize()
  r = store.StoreReader(tmp_path)
  assert r.spec.sampling == draw and r.manifest["sampling"] == draw
  rec = r.read(np.arange(n))
  np.testing.assert_array_equal(rec["ids_NxLxK"][mask], ids[mask])
  f16 = lambda x: np.asarray(x, np.float16).astype(np.float32)
  np.testing.assert_array_equal(rec["logprobs_NxLxK"][mask], f16(lp[mask]))
  np.testing.assert_array_equal(rec["tail_logmass_NxL"][mask], f16(log_tau[mask]))
  for other in ({**draw, "temperature": 1.0}, {}):
    with pytest.raises(UserError, match="sampling differs"):
      store.StoreWriter(tmp_path, dataclasses.replace(spec, sampling=other))



@pytest.mark.slow
def test_sampled_students_in_the_pipeline(smoke_workdir, tmp_path, caplog):
  """kd-sampled and first-sampled on the smoke run: the sample stage draws one store per
  temperature (1, and calibrate's log_space-bucket t), the students train on them, and a
  re-run finds everything done."""
  import json
  import logging
  import os
  import shutil
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  from first_jax.stages import pipeline
  wd = str(tmp_path / "wd")
  shutil.copytree(smoke_workdir, wd)
  args = ["--config", SMOKE, f"--config.workdir={wd}",
          "--config.students=sft,kd-sampled,first-sampled-log_space"]
  pipeline.run(Job(config_lib.load(args)))  # not cli.stage_main: its log setup drops caplog
  calib = json.load(open(os.path.join(wd, "store", "manifest.json")))["calibration"]
  t = calib["searches"]["log_space-bucket"]["best_t"]
  for temp in (1.0, t):
    m = store.StoreReader(os.path.join(wd, "sampled", f"t{temp:.6g}")).manifest
    assert m["complete"] and m["k"] == 10 and m["sampling"]["temperature"] == temp
  for name in ("kd-sampled", "first-sampled-log_space"):
    assert os.path.exists(os.path.join(wd, "students", name, "export", "config.json"))
  results = json.load(open(os.path.join(wd, "eval", "results.json")))
  assert "first-sampled-log_space" in json.dumps(results)
  caplog.clear()
  caplog.set_level(logging.INFO)
  pipeline.run(Job(config_lib.load(args)))
  done = [r.getMessage() for r in caplog.records if "done already" in r.getMessage()]
  assert any(m.startswith("sample: done already") for m in done), done
  assert any(m.startswith("train: done already") for m in done), done
