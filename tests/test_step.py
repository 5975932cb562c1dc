"""The pure train step: learning, answer-only equivalence, offline == online, in-step search."""
import functools

import jax
import numpy as np
import pytest

import jax.numpy as jnp

from first_jax.core import step, temperature
from first_jax import models
from first_jax.engine import infer

V, L, B = 97, 12, 4


def tiny(seed, layers=1, hidden=32):
  mc = models.ModelConfig.from_dict(dict(
      model_type="llama", vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
      tie_word_embeddings=False, scan_layers=True))
  params = models.init_params(mc, jax.random.key(seed))
  return models.Model(mc, params)


def make_batch(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(L // 2, L + 1, B)
  ids = rng.integers(0, V, (B, L)).astype(np.int32)
  attn = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], 1)
  answer = (lengths - 2).astype(np.int32)
  loss_mask = np.zeros((B, L), np.float32)
  loss_mask[np.arange(B), answer] = 1.0
  choice_ids = np.stack([targets[np.arange(B), answer], (targets[np.arange(B), answer] + 1) % V],
                        1).astype(np.int32)
  return {"input_ids": ids, "attention_mask": attn, "targets": targets, "loss_mask": loss_mask,
          "answer_pos": answer, "choice_ids": choice_ids,
          "label": np.zeros(B, np.int32)}


def run_steps(model, spec, batch, n, teacher=None, lr=3e-3):
  tx = step.make_optimizer(lr=lr, total_steps=n, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(model.params, tx)
  fn = jax.jit(functools.partial(
      step.train_step, student_apply=models.apply_fn(model.module),
      teacher_apply=models.apply_fn(teacher.module) if teacher else None, spec=spec, tx=tx))
  losses = []
  for _ in range(n):
    state, m = fn(state, batch, teacher.params if teacher else None)
    losses.append(float(m["loss"][0] / m["loss"][1]))
  return state, losses


def test_ce_step_learns_a_fixed_batch():
  _, losses = run_steps(tiny(0), step.LossSpec(kind="ce"), make_batch(1), 25)
  assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ce", "topk_kd", "full_kd"])
def test_answer_only_equals_full_positions(kind):
  """The head at the answer position only gives the same loss and gradients."""
  student, teacher, batch = tiny(0), tiny(1, layers=2), make_batch(2)
  apply_s, apply_t = models.apply_fn(student.module), models.apply_fn(teacher.module)
  tx = step.make_optimizer(lr=1e-3, total_steps=1, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(student.params, tx, initial_temperature=0.7)
  out = []
  for answer_only in (False, True):
    spec = step.LossSpec(kind=kind, answer_only=answer_only, online=kind != "ce",
                         temperature_mode="log_space")
    f = jax.value_and_grad(functools.partial(step.loss_fn, student_apply=apply_s,
                                             teacher_apply=apply_t, spec=spec), has_aux=True)
    (loss, _), grads = f(student.params, state, batch, teacher.params)
    out.append((loss, grads))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("mode", ["prob_softmax", "log_space", None])
def test_offline_equals_online_on_the_same_batch(tail, mode):
  """Targets precomputed by the extraction step (offline) == teacher inside the step (online)."""
  student, teacher, batch = tiny(3), tiny(4, layers=2), make_batch(5)
  apply_s, apply_t = models.apply_fn(student.module), models.apply_fn(teacher.module)
  targets = jax.jit(functools.partial(infer.teacher_topk, apply=apply_t, k=5))(
      teacher.params, batch)
  tx = step.make_optimizer(lr=1e-3, total_steps=1, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(student.params, tx, initial_temperature=0.6)
  losses = []
  for online in (False, True):
    spec = step.LossSpec(kind="topk_kd", tail=tail, temperature_mode=mode, online=online)
    b = batch if online else {**batch, **targets}
    loss, _ = step.loss_fn(student.params, state, b, teacher.params, student_apply=apply_s,
                           teacher_apply=apply_t, spec=spec)
    losses.append(float(loss))
  assert losses[0] > 0
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


@pytest.mark.slow
def test_online_search_buffers_events_and_starts_from_the_given_temperature():
  student, teacher, batch = tiny(6), tiny(7, layers=2), make_batch(8)
  batch["loss_mask"] = batch["attention_mask"].astype(np.float32)  # many token events
  n_events = int(batch["loss_mask"].sum())
  spec = step.LossSpec(kind="topk_kd", online=True, search=True, temperature_mode="log_space",
                       search_events=64, search_min_events=n_events + 1)
  apply_s, apply_t = models.apply_fn(student.module), models.apply_fn(teacher.module)
  tx = step.make_optimizer(lr=1e-3, total_steps=3, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(student.params, tx, initial_temperature=0.8,
                          events=step.event_buffer(64, 5))
  fn = jax.jit(functools.partial(step.train_step, student_apply=apply_s, teacher_apply=apply_t,
                                 spec=spec, tx=tx))
  state, _ = fn(state, batch, teacher.params)
  assert float(state.temperature) == pytest.approx(0.8)  # too few events yet: the start value
  assert float(state.events["weight"].sum()) == n_events
  state, _ = fn(state, batch, teacher.params)  # now 2 * n_events > min (buffer wraps: 64 slots)
  targets = step.teacher_topk(apply_t(teacher.params, batch["input_ids"],
                                      batch["attention_mask"]), 5)
  buf = step.add_events(step.add_events(step.event_buffer(64, 5), targets, batch), targets,
                        batch)
  direct = float(step.searched_temperature(buf, spec))
  assert float(state.temperature) == pytest.approx(direct, rel=1e-6) and direct != 0.8
  assert int(state.events["next"]) == (2 * B * L) % 64


def test_online_search_ends_within_ten_percent_of_the_offline_search():
  """A bigram teacher over-confident by 2x (data drawn from softmax(E / 2)): the buffered
  online search over the stream ends near the offline search over all of it."""
  rng = np.random.default_rng(12)
  e_VxV = (rng.normal(size=(V, V)) * 2.5).astype(np.float32)
  p_VxV = np.exp(e_VxV / 2.0)
  p_VxV /= p_VxV.sum(-1, keepdims=True)
  n, length = 256, 17
  seqs = np.zeros((n, length), np.int32)
  seqs[:, 0] = rng.integers(0, V, n)
  for t in range(1, length):
    u = rng.uniform(size=(n, 1))
    seqs[:, t] = (p_VxV[seqs[:, t - 1]].cumsum(-1) > u).argmax(-1)
  ids, targets = seqs[:, :-1], seqs[:, 1:]
  mask = np.ones_like(ids, np.float32)
  teacher_apply = lambda params, x, attention_mask=None, **kw: params["E"][x]
  lp, top_ids, tail = step.topk.extract(jnp.asarray(e_VxV[ids]), 5)
  offline = float(temperature.search(
      lp.reshape(-1, 5), top_ids.reshape(-1, 5), jnp.asarray(targets.reshape(-1)),
      mode="log_space", tail_logmass_N=tail.reshape(-1)).best_t)
  assert offline > 1.3  # the premise: softening
  spec = step.LossSpec(kind="topk_kd", online=True, search=True, temperature_mode="log_space",
                       search_events=2048, search_min_events=256)
  student = tiny(13)
  tx = step.make_optimizer(lr=1e-3, total_steps=16, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(student.params, tx, events=step.event_buffer(2048, 5))
  fn = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(
      student.module), teacher_apply=teacher_apply, spec=spec, tx=tx))
  for i in range(16):
    rows = slice(16 * i, 16 * (i + 1))
    batch = {"input_ids": ids[rows], "attention_mask": np.ones_like(ids[rows]),
             "targets": targets[rows], "loss_mask": mask[rows]}
    state, _ = fn(state, batch, {"E": jnp.asarray(e_VxV)})
  assert float(state.temperature) == pytest.approx(offline, rel=0.1)


def test_teacher_is_not_updated_and_only_student_params_in_opt_state():
  """Through the jitted step training builds (`trainer.compile_step`, state donated): the
  teacher's buffers survive every step (never donated) with their values, and the optimizer
  holds moments shaped like the student's params only (the 2-layer teacher's differ)."""
  from first_jax.runtime import sharding
  from first_jax.engine import trainer
  student, teacher, batch = tiny(9), tiny(10, layers=2), make_batch(11)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  rep = sharding.replicated(mesh)
  place = lambda p: jax.device_put(p, rep)  # noqa: E731
  student_params, teacher_params = place(student.params), place(teacher.params)
  before = jax.tree.map(np.asarray, teacher_params)
  tx = step.make_optimizer(lr=3e-3, total_steps=3, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  spec = step.LossSpec(kind="topk_kd", online=True, temperature_mode=None)
  state, fn = trainer.compile_step(student.module, student_params, spec, tx, mesh,
                                   sharding.batch_sharding(mesh),
                                   teacher_module=teacher.module, teacher_params=teacher_params)
  losses = []
  for _ in range(3):
    old = state
    state, m = fn(state, jax.device_put(batch, sharding.batch_sharding(mesh)), teacher_params)
    losses.append(float(m["loss"][0] / m["loss"][1]))
  assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # the state is donated
  assert not any(x.is_deleted() for x in jax.tree.leaves(teacher_params))  # the teacher is not
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, teacher_params))
  shapes = lambda t: [x.shape for x in jax.tree.leaves(t)]  # noqa: E731
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if path and any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
  assert len(moments) == 2 * len(jax.tree.leaves(student.params))
  assert sorted(x.shape for x in moments) == sorted(shapes(student.params) * 2)
  assert sorted(shapes(student.params)) != sorted(shapes(teacher.params))
  assert jax.tree.structure(state.params) == jax.tree.structure(student.params)
  assert losses[-1] < losses[0]


def test_cpu_step_options_compile_and_update_as_the_default_program():
  """`trainer.jit_step` compiles the step with `xla_options.fused_dots` on CPU (a jaxlib that
  renames or drops the option fails here) and makes the same update as the step compiled
  without them, loss, metrics and parameters."""
  from first_jax.runtime import sharding
  from first_jax.engine import trainer
  student, batch = tiny(17, layers=2, hidden=64), make_batch(18)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = step.make_optimizer(lr=3e-3, total_steps=4, warmup_ratio=0.0, weight_decay=0.01,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  spec = step.LossSpec(kind="ce")
  state, fn = trainer.compile_step(student.module, student.params, spec, tx, mesh,
                                   sharding.batch_sharding(mesh))
  plain = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(
      student.module), teacher_apply=None, spec=spec, tx=tx))
  ref_state = step.init_state(student.params, tx)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  fn, plain = fn.lower(state, batch, None).compile(), plain.lower(ref_state, batch, None).compile()
  # the options took: YNNPACK's matmuls come fused with their neighbours, in fewer calls
  assert 0 < fn.as_text().count("ynn_fusion") < plain.as_text().count("ynn_fusion")
  for _ in range(2):
    state, m = fn(state, batch, None)
    ref_state, ref_m = plain(ref_state, batch, None)
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(np.asarray(m[key]), np.asarray(ref_m[key]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                       atol=1e-6), state.params, ref_state.params)


def test_answer_only_extraction_matches_full_at_the_answer_positions():
  teacher, batch = tiny(12, layers=2), make_batch(13)
  apply = models.apply_fn(teacher.module)
  full = infer.teacher_topk(teacher.params, batch, apply=apply, k=5)
  sparse = infer.teacher_topk(teacher.params, batch, apply=apply, k=5, answer_only=True)
  rows, pos = np.arange(B), batch["answer_pos"]
  for key in full:
    assert sparse[key].shape == full[key].shape
    np.testing.assert_allclose(np.asarray(sparse[key])[rows, pos],
                               np.asarray(full[key])[rows, pos], rtol=1e-5, atol=1e-6)
  other = np.ones((B, L), bool)
  other[rows, pos] = False
  assert np.all(np.asarray(sparse["teacher_ids"])[other] == 0)


def test_non_finite_gradient_skips_the_update():
  student, batch = tiny(14), make_batch(15)
  apply_s = models.apply_fn(student.module)
  tx = step.make_optimizer(lr=1e-2, total_steps=4, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  spec = step.LossSpec(kind="topk_kd", temperature_mode=None)
  fn = jax.jit(functools.partial(step.train_step, student_apply=apply_s, teacher_apply=None,
                                 spec=spec, tx=tx))
  rng = np.random.default_rng(16)
  lp = np.log(rng.dirichlet(np.ones(6), size=(B, L)))[..., :5].astype(np.float32)
  good = {**batch, "teacher_ids": rng.integers(0, V, (B, L, 5)).astype(np.int32),
          "teacher_logprobs": lp, "teacher_tail": np.log1p(-np.exp(lp).sum(-1))}
  bad = {**good, "teacher_logprobs": np.where(np.arange(5) == 2, np.nan, lp).astype(np.float32)}
  state = step.init_state(student.params, tx)
  before = jax.tree.map(np.asarray, state.params)
  state, m = fn(state, bad)
  assert float(m["skipped"][0]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))
  state, m = fn(state, good)
  assert float(m["skipped"][0]) == 0.0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, state.params)
  assert all(jax.tree.leaves(changed))
