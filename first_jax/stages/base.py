"""What every stage is, and the one place that runs one.

A `Stage` names its work (`run`), whether its outputs already exist for this run
(`is_done`), the folders it writes (`outputs`: `resume=false` moves them aside first) and what
a skipped stage still owes its caller (`when_done`, `prune`). `execute` is the only caller of a
stage's `run`, for `python -m first_jax.<stage>` and for every stage of the pipeline alike: it
skips a finished stage with one "<stage>: done already (...)" line, starts over when
`resume=false`, and records the seconds of a stage that did its work in workdir/timings.json.
Every part takes the run's `Job` (first_jax.engine.job): the config resolved once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

from first_jax.runtime import distributed, io_util
from first_jax.engine import workspace
from first_jax.engine.job import Job

log = logging.getLogger(__name__)


def _nothing(job: Job) -> None:
  del job


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the pipeline (see the module docstring)."""
  name: str
  run: Callable[[Job], Any]  # the work; finished parts of it (shards, students) are kept
  is_done: Callable[[Job], bool]  # outputs there, and of this run's config
  where: Callable[[Job], str]  # what its "done already" line names
  outputs: Callable[[Job], list[str]] = lambda job: []  # moved aside by resume=false
  when_done: Callable[[Job], Any] = _nothing  # a skipped stage's result
  prune: Callable[[Job], None] = _nothing  # a skipped training stage finishes its pruning


def _record_seconds(job: Job, name: str, seconds: float) -> None:
  """`name`'s seconds into workdir/timings.json (process 0; the other stages' figures kept)."""
  if not distributed.is_main():
    return
  path = job.layout.timings
  timings = {}
  if os.path.exists(path):
    with open(path) as f:
      timings = json.load(f)
  timings[name] = round(seconds, 2)
  io_util.atomic_write_json(path, timings)


def execute(stage: Stage, job: Job) -> Any:
  """Runs `stage` unless it is done (`resume` and `is_done`); `resume=false` first moves its
  outputs aside. Returns its result (a skipped stage's `when_done`)."""
  if distributed.is_main():  # a killed timings write's temp file (the workdir is locked)
    io_util.remove_stale_temps(job.layout.root, ".tmp-timings.json-*")
  if job.resume and stage.is_done(job):
    log.info("%s: done already (%s)", stage.name, stage.where(job))
    stage.prune(job)
    return stage.when_done(job)
  if not job.resume:
    for folder in stage.outputs(job):
      workspace.start_over(folder)
  log.info("%s: running", stage.name)
  t0 = time.time()
  result = stage.run(job)
  _record_seconds(job, stage.name, time.time() - t0)
  return result
