"""The training loop: a killed run resumes to exactly the unbroken run's losses."""
import functools
import json
import os
import signal

import jax
import numpy as np
import pytest

from first_jax.runtime import preemption
from first_jax.core import step
from first_jax.data import batches as data
from first_jax import models
from first_jax.engine import trainer
from tests.test_step import make_batch, tiny


def arrays(n=24, seed=0):
  parts = [make_batch(seed + i) for i in range(n // 4)]
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out["example_id"] = np.arange(n)
  return out


def losses_by_step(folder):
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), steps  # a resume drops the rows it redoes: no repeats
  return {r["step"]: r["t/loss"] for r in rows}


def run(folder, total, kill_after=None, sigterm_at=None, resume=True, batches=None):
  """fit() of a tiny CE run over `batches` (default: BatchIterator, 6 batches an epoch)."""
  model = tiny(0)
  tx = step.make_optimizer(lr=3e-3, total_steps=total, warmup_ratio=0.2, weight_decay=0.01,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(model.params, tx)
  fn = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(model.module),
                                 teacher_apply=None, spec=step.LossSpec(kind="ce"), tx=tx))
  calls = {"n": 0}

  def step_fn(state, batch, teacher_params):
    if kill_after is not None and calls["n"] == kill_after:
      raise KeyboardInterrupt("killed")
    if sigterm_at is not None and calls["n"] == sigterm_at:  # arrives in the middle of a step
      os.kill(os.getpid(), signal.SIGTERM)
    calls["n"] += 1
    return fn(state, batch, teacher_params)

  if batches is None:
    batches = data.BatchIterator(arrays(), batch_size=4, seed=3)  # 6 batches an epoch
  put = lambda b: {k: v for k, v in b.items() if k != "example_id"}
  return trainer.fit(name="t", folder=folder, state=state, step_fn=step_fn, batches=batches,
                     total_steps=total, put_batch=put, every_steps=4, keep=2, log_every=1,
                     resume=resume)


def test_killed_run_resumes_exactly(tmp_path):
  total = 14  # crosses two epoch boundaries
  unbroken = run(str(tmp_path / "a"), total)
  with pytest.raises(KeyboardInterrupt):
    run(str(tmp_path / "b"), total, kill_after=10)  # last checkpoint: step 8
  resumed = run(str(tmp_path / "b"), total)
  a, b = losses_by_step(str(tmp_path / "a")), losses_by_step(str(tmp_path / "b"))
  assert sorted(a) == sorted(b) == list(range(1, total + 1))
  for s in range(1, total + 1):
    assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6),
               unbroken.params, resumed.params)
  assert int(resumed.step) == total
  steps = lambda run: sorted(int(d) for d in os.listdir(tmp_path / run / "checkpoints")
                             if d.isdigit())
  for r in ("a", "b"):
    assert total in steps(r) and len(steps(r)) <= 3, steps(r)  # keep-last-2 plus the best


@pytest.mark.slow
def test_resume_true_continues_and_resume_false_starts_over(tmp_path, caplog):
  caplog.set_level("INFO")
  run(str(tmp_path / "a"), 4)
  state = run(str(tmp_path / "a"), 8)  # resume=True: steps 5..8 only
  assert int(state.step) == 8 and "resuming at step 4 of 8" in caplog.text
  caplog.clear()
  again = run(str(tmp_path / "a"), 8, resume=False)  # from step 0, whatever is saved
  assert int(again.step) == 8 and "resuming" not in caplog.text
  fresh = run(str(tmp_path / "b"), 8)
  assert losses_by_step(str(tmp_path / "a")) == losses_by_step(str(tmp_path / "b"))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               again.params, fresh.params)


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_resumes_exactly(tmp_path):
  total = 14
  unbroken = run(str(tmp_path / "a"), total)
  old = signal.getsignal(signal.SIGTERM)
  preemption.install()
  try:
    with pytest.raises(preemption.Preempted, match="stopped at step 7"):
      run(str(tmp_path / "b"), total, sigterm_at=6)  # the 7th step finishes, then stops
  finally:
    signal.signal(signal.SIGTERM, old)
  ckpts = sorted(int(d) for d in os.listdir(tmp_path / "b" / "checkpoints") if d.isdigit())
  assert ckpts[-1] == 7  # not a multiple of every_steps=4: saved because of the signal
  resumed = run(str(tmp_path / "b"), total)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6),
               unbroken.params, resumed.params)


def test_a_run_of_non_finite_steps_stops_with_one_line(tmp_path):
  from first_jax.runtime.errors import UserError
  model = tiny(0)
  tx = step.make_optimizer(lr=3e-3, total_steps=10, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  state = step.init_state(model.params, tx)
  fn = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(model.module),
                                 teacher_apply=None, spec=step.LossSpec(kind="ce"), tx=tx))
  nan_params = jax.tree.map(lambda x: x * np.nan, model.params)
  # every step's gradient is non-finite: the loss is computed from NaN weights
  step_fn = lambda s, b, t: fn(s.replace(params=nan_params), b, t)
  batches = data.BatchIterator(arrays(), batch_size=4, seed=3)
  put = lambda b: {k: v for k, v in b.items() if k != "example_id"}
  with pytest.raises(UserError, match="3 steps in a row up to step 3 had a non-finite"):
    trainer.fit(name="t", folder=str(tmp_path / "n"), state=state, step_fn=step_fn,
                batches=batches, total_steps=10, put_batch=put, every_steps=100, keep=2,
                log_every=1, max_skipped=3)
