"""The one training loop: data -> jitted step -> metrics -> checkpoint, resumable.

Every training stage (teacher fine-tuning, student SFT, distillation) runs through `fit`.
Metrics are (sum, count) pairs reduced on the host one step late, so the host never waits on
the device; they go to a JSONL file, TensorBoard event files and the progress bar.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Iterator

import jax

from first_jax.runtime import (checkpoint as ckpt_lib, distributed, io_util, log as log_lib,
                               preemption, sharding, xla_options)
from first_jax.runtime.errors import UserError
from first_jax.core import step as step_lib
from first_jax.data import batches as data_lib
from first_jax import models

log = logging.getLogger(__name__)

StepFn = Callable[[Any, dict, Any], tuple[Any, dict]]


def _step_of(row: str) -> int | None:
  try:
    return int(json.loads(row)["step"])
  except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
    return None


class MetricsWriter:
  """Appends interval means to metrics.jsonl and TensorBoard event files under `folder`
  (process 0 only: the means are global, every process holds the same)."""

  def __init__(self, folder: str, resumed_at: int = 0):
    """`resumed_at`: rows of later steps (logged before a kill, about to be redone) are dropped."""
    self._jsonl = self._tb = None
    if not distributed.is_main():
      return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        rows = [line for line in f if line.strip()]
      keep = [r for r in rows if _step_of(r) is not None and _step_of(r) <= resumed_at]
      if len(keep) != len(rows):
        io_util.atomic_write_bytes(path, "".join(keep).encode())
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(folder, "tensorboard"),
                               purge_step=resumed_at + 1 if resumed_at else None)
    except ImportError:  # optional: JSONL is the record
      self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _Accumulator:
  """Sums (sum, count) metric pairs over a logging interval; counts skipped steps in a row."""

  def __init__(self):
    self.sums: dict[str, list[float]] = {}
    self.skipped_in_a_row = 0

  def add(self, metrics: dict) -> None:
    metrics = jax.device_get(metrics)
    if "skipped" in metrics:
      skipped = float(metrics["skipped"][0]) > 0
      self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
    for name, (total, count) in metrics.items():
      s = self.sums.setdefault(name, [0.0, 0.0])
      s[0] += float(total)
      s[1] += float(count)

  def means(self, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/{n}": s / max(c, 1e-9) for n, (s, c) in self.sums.items()}
    self.sums = {}
    return out


def _check_finite(name: str, acc: _Accumulator, step: int, max_skipped: int) -> None:
  if acc.skipped_in_a_row >= max_skipped:
    raise UserError(f"{name}: {acc.skipped_in_a_row} steps in a row up to step {step} had a "
                    f"non-finite loss or gradient (updates skipped); stopped, the last "
                    f"checkpoint is kept (lower the learning rate or check the data)")


def fit(*, name: str, folder: str, state: Any, step_fn: StepFn, batches: Any,
        total_steps: int, put_batch: Callable[[dict], dict], teacher_params: Any = None,
        resume: bool = True, every_steps: int = 50, keep: int = 2,
        log_every: int = 10, max_skipped: int = 20) -> Any:
  """Runs `step_fn` until `total_steps`, checkpointing (state, data position) as it goes.

  Args:
    name: metric prefix (e.g. "finetune", "distill").
    folder: the run's folder (checkpoints/, metrics.jsonl, tensorboard/).
    state: the initial train state (already placed with its shardings).
    step_fn: jitted `(state, batch, teacher_params) -> (state, metrics)`.
    batches: iterator of host batches with `state()` / `restore(dict)` (first_jax.data.batches).
    total_steps: steps of the whole run (a resumed run continues up to it).
    put_batch: host batch -> device batch (adds store targets, shards over the mesh).
    max_skipped: stop (UserError) after this many steps in a row whose update was skipped for a
      non-finite gradient.
  """
  ckpt_dir = os.path.join(folder, "checkpoints")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=keep)
  if not resume and ckpt.latest_step() is not None:  # start over: the old steps moved aside
    ckpt.close()
    if distributed.is_main():
      aside = f"{ckpt_dir}.old-{int(time.time())}"
      os.rename(ckpt_dir, aside)
      log.warning("%s: resume=false, starting over; earlier checkpoints moved to %s", name, aside)
    distributed.sync(f"start over: {ckpt_dir}")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=keep)
  start = 0
  if resume and ckpt.latest_step() is not None:
    # the newest step that restores completely (state and data position); damaged ones are
    # moved aside with a warning; none left: start over (the iterator back at its start)
    initial = batches.state()
    restored = ckpt.restore_newest(ckpt_lib.abstract_like(state), accept_data=batches.restore)
    if restored is None:
      batches.restore(initial)
    else:
      state, _, start = restored
      log.info("%s: resuming at step %d of %d", name, start, total_steps)
  writer = MetricsWriter(folder, resumed_at=start)
  acc, pending, last_loss = _Accumulator(), None, None
  bar = log_lib.progress(range(start, total_steps), desc=name, total=total_steps, initial=start)
  t0 = time.time()
  it: Iterator[dict] = iter(batches)
  with preemption.step_boundaries():  # SIGTERM waits for the end of a step
    try:
      for step in bar:
        batch = put_batch(next(it))
        state, metrics = step_fn(state, batch, teacher_params)
        if pending is not None:  # fetch one step late: the device is already on the next step
          acc.add(pending)
          _check_finite(name, acc, step, max_skipped)
        pending = metrics
        done = step + 1
        if done % log_every == 0 or done == total_steps:
          acc.add(pending)
          _check_finite(name, acc, done, max_skipped)
          pending = None
          scalars = acc.means(name)
          scalars[f"{name}/steps_per_s"] = (done - start) / max(time.time() - t0, 1e-9)
          writer.write(done, scalars)
          last_loss = scalars.get(f"{name}/loss")
          bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "?")
        stop = preemption.stop_agreed(done)  # the same answer on every host at this step
        if done % every_steps == 0 or done == total_steps:
          ckpt.save(done, state, batches.state(), loss=last_loss, force=done == total_steps)
        elif stop:  # SIGTERM: a checkpoint at this step (every host together), then stop
          ckpt.save(done, state, batches.state(), loss=last_loss, force=True)
        if stop:
          raise preemption.Preempted(f"{name}: stopped at step {done} (checkpoint saved)")
    finally:  # also on Ctrl-C: let an in-flight async save finish so the checkpoint is whole
      bar.close()
      ckpt.close()
      writer.close()
  return state


def state_shardings(tx, params: Any, events: Any, mesh) -> step_lib.TrainState:
  """The train state's layout: params as placed (logical rules), optimizer moments like their
  params (`sharding.opt_state_shardings`), counters, temperature and events replicated."""
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  rep = sharding.replicated(mesh)
  return step_lib.TrainState(
      step=rep, params=param_sh,
      opt_state=sharding.opt_state_shardings(tx, params, param_sh, mesh),
      temperature=rep, events=None if events is None else jax.tree.map(lambda _: rep, events))


def jit_step(module, spec, tx, mesh, batch_sharding, state_sh: step_lib.TrainState, *,
             teacher_module=None, teacher_sh: Any = None) -> StepFn:
  """The jitted step with explicit layouts: the state keeps its shardings `state_sh` step after
  step (donated, updated in place), every batch entry is split over (data, fsdp) on its leading
  axis, the teacher (never donated) keeps its own `teacher_sh`, metrics come back replicated.
  On CPU, a float32 step compiles with YNNPACK's fused matmuls (`xla_options.fused_dots`); a
  step whose student or teacher computes in bfloat16 keeps XLA's defaults."""
  return jax.jit(functools.partial(
      step_lib.train_step, student_apply=models.apply_fn(module),
      teacher_apply=models.apply_fn(teacher_module) if teacher_module is not None else None,
      spec=spec, tx=tx, mesh=mesh),
      in_shardings=(state_sh, batch_sharding, teacher_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=xla_options.fused_dots(mesh.devices.flat[0].platform,
                                              _compute_dtype(module, teacher_module)))


def _compute_dtype(*modules) -> str:
  """"float32" when every given model computes in float32, else the first other dtype."""
  dtypes = [str(jax.numpy.dtype(m.config.dtype)) for m in modules if m is not None]
  return next((d for d in dtypes if d != "float32"), "float32")


def compile_step(module, params: Any, spec, tx, mesh, batch_sharding, *, teacher_module=None,
                 teacher_params: Any = None, events: Any = None,
                 initial_temperature: float = 1.0) -> tuple[step_lib.TrainState, StepFn]:
  """The initial train state, placed (`state_shardings`), and its jitted step (`jit_step`)."""
  state_sh = state_shardings(tx, params, events, mesh)
  state = jax.jit(functools.partial(step_lib.init_state, tx=tx,
                                    initial_temperature=initial_temperature),
                  out_shardings=state_sh)(params, events=events)
  teacher_sh = (None if teacher_params is None
                else jax.tree.map(lambda x: x.sharding, teacher_params))
  return state, jit_step(module, spec, tx, mesh, batch_sharding, state_sh,
                         teacher_module=teacher_module, teacher_sh=teacher_sh)


def train_model(*, name: str, folder: str, module, params: Any, arrays: dict, spec,
                optim, seed: int, mesh, batch_sharding, resume: bool, every_steps: int,
                keep: int, log_every: int, teacher_module=None, teacher_params: Any = None,
                add_targets: Callable[[dict], dict] | None = None,
                initial_temperature: float = 1.0) -> Any:
  """Builds optimizer, state and the jitted step for one run, then `fit`s it. Returns params."""
  buckets = tuple(optim.get("length_buckets", ()))
  # each host gathers (and reads the store records of) only its rows of each global batch
  batches = data_lib.BatchIterator(
      arrays, optim.batch_size, seed=seed, shuffle=True, drop_remainder=True,
      length_buckets=buckets, trim=True,  # one compiled step per bucket length
      host_rows=sharding.process_rows(batch_sharding, optim.batch_size),
      add_fields=add_targets)
  steps_per_epoch = len(arrays["input_ids"]) // optim.batch_size
  total = max(1, steps_per_epoch * optim.epochs)
  tx = step_lib.make_optimizer(lr=optim.lr, total_steps=total, warmup_ratio=optim.warmup_ratio,
                               weight_decay=optim.weight_decay, clip_norm=optim.clip_norm,
                               b1=optim.b1, b2=optim.b2, eps=optim.eps,
                               grad_accum=optim.grad_accum)
  events = None
  if spec.search:  # the online search's buffer of teacher events
    events = step_lib.event_buffer(
        spec.search_events, spec.k,
        arrays["choice_ids"].shape[1] if spec.search_choices else 0)
  state, step_fn = compile_step(module, params, spec, tx, mesh, batch_sharding,
                                teacher_module=teacher_module, teacher_params=teacher_params,
                                events=events, initial_temperature=initial_temperature)

  def put_batch(batch: dict) -> dict:  # this host's rows -> the global batch
    return sharding.put_process_rows({k: v for k, v in batch.items() if k != "example_id"},
                                     batch_sharding, optim.batch_size)

  state = fit(name=name, folder=folder, state=state, step_fn=step_fn, batches=batches,
              total_steps=total, put_batch=put_batch, teacher_params=teacher_params,
              resume=resume, every_steps=every_steps, keep=keep, log_every=log_every)
  return state.params
