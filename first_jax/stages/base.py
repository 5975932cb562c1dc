"""What every stage is, and the one place that runs one.

A `Stage` names its work (`run`), whether its outputs already exist for this config
(`is_done`), the folders it writes (`outputs`: `resume=false` moves them aside first) and what
a skipped stage still owes its caller (`when_done`, `prune`). `execute` is the only caller of a
stage's `run`, for `python -m first_jax.<stage>` and for every stage of the pipeline alike: it
skips a finished stage with one "<stage>: done already (...)" line, starts over when
`resume=false`, and records the seconds of a stage that did its work in workdir/timings.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable


from first_jax.runtime import distributed, io_util
from first_jax.engine import workspace

log = logging.getLogger(__name__)

Config = Any  # the validated ml_collections.ConfigDict


class Inputs:
  """What done-checks share: the tokenizer and the in-domain data's fingerprint, loaded at the
  first check that needs them (no model is loaded, nothing is encoded or written)."""

  def __init__(self, cfg: Config):
    self._cfg = cfg

  @functools.cached_property
  def tokenizer(self):
    return workspace.tokenizer(self._cfg)

  @functools.cached_property
  def data_fingerprint(self) -> str:
    return workspace.data_fingerprint(self._cfg, self.tokenizer)


def _nothing(cfg: Config) -> None:
  del cfg


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the pipeline (see the module docstring)."""
  name: str
  run: Callable[[Config], Any]  # the work; finished parts of it (shards, students) are kept
  is_done: Callable[[Config, Inputs], bool]  # outputs there, and of this config
  where: Callable[[Config], str]  # what its "done already" line names
  outputs: Callable[[Config], list[str]] = lambda cfg: []  # moved aside by resume=false
  when_done: Callable[[Config], Any] = _nothing  # a skipped stage's result
  prune: Callable[[Config], None] = _nothing  # a skipped training stage finishes its pruning


def timings_path(cfg: Config) -> str:
  return workspace.folder(cfg, "timings.json")


def _record_seconds(cfg: Config, name: str, seconds: float) -> None:
  """`name`'s seconds into workdir/timings.json (process 0; the other stages' figures kept)."""
  if not distributed.is_main():
    return
  path = timings_path(cfg)
  timings = {}
  if os.path.exists(path):
    with open(path) as f:
      timings = json.load(f)
  timings[name] = round(seconds, 2)
  io_util.atomic_write_json(path, timings)


def execute(stage: Stage, cfg: Config, inputs: Inputs | None = None) -> Any:
  """Runs `stage` unless it is done (`cfg.resume` and `is_done`); `resume=false` first moves
  its outputs aside. Returns its result (a skipped stage's `when_done`)."""
  inputs = Inputs(cfg) if inputs is None else inputs
  if distributed.is_main():  # a killed timings write's temp file (the workdir is locked)
    io_util.remove_stale_temps(os.path.dirname(timings_path(cfg)), ".tmp-timings.json-*")
  if cfg.resume and stage.is_done(cfg, inputs):
    log.info("%s: done already (%s)", stage.name, stage.where(cfg))
    stage.prune(cfg)
    return stage.when_done(cfg)
  if not cfg.resume:
    for folder in stage.outputs(cfg):
      workspace.start_over(folder)
  log.info("%s: running", stage.name)
  t0 = time.time()
  result = stage.run(cfg)
  _record_seconds(cfg, stage.name, time.time() - t0)
  return result
