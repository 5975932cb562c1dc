"""All stages in order from one config: finetune -> extract -> calibrate -> train -> evaluate.

Stages whose outputs exist and match the config are skipped, each with a line "<stage>: done
already (...)": done-markers (done.json) of the teacher, the students and the evaluation, the
store manifest (complete, of this teacher, data and k) and its calibration fingerprint. A killed
pipeline resumes where it stopped (finished store shards, training checkpoints, cached scores).
`resume=false` starts over: each stage's existing output folder is moved aside to
`<folder>.old-<unix time>` before the stage runs (the calibration is redone on the new store).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax

from first_jax import calibrate, cli, evaluate, extract, finetune, io_util, store, train
from first_jax import workspace

log = logging.getLogger(__name__)
STAGES = ("finetune", "extract", "calibrate", "train", "evaluate")


def _store_done(cfg, data_fingerprint: str) -> bool:
  """The store is complete and of this config's teacher, data, k and log-prob dtype (what
  extract would otherwise verify, or refuse)."""
  m = store.read_manifest(workspace.folder(cfg, "store"))
  return bool(m is not None and m.get("complete")
              and (m.get("teacher") or {}).get("fingerprint") == workspace.teacher_fingerprint(cfg)
              and m.get("data_fingerprint") == data_fingerprint and m.get("k") == cfg.extract.k
              and m.get("logprob_dtype") == cfg.extract.logprob_dtype)


class _Checks:
  """Each stage's done-check, sharing the tokenizer and data fingerprint they need (loaded at the
  first check that needs them: no model is loaded and nothing is encoded or written)."""

  def __init__(self, cfg):
    self.cfg, self._tok, self._data_fp = cfg, None, None

  def _data(self):
    if self._data_fp is None:
      self._tok = workspace.tokenizer(self.cfg)
      self._data_fp = workspace.data_fingerprint(self.cfg, self._tok)
    return self._tok, self._data_fp

  def is_done(self, name: str) -> bool:
    cfg = self.cfg
    if name == "finetune":
      return finetune.is_done(cfg)
    if name == "train":
      return all(train.is_done(cfg, v) for v in train.run_checks(cfg))
    tok, data_fp = self._data()
    if name == "extract":
      return _store_done(cfg, data_fp)
    if name == "calibrate":
      return calibrate.is_done(cfg, data_fp)
    return evaluate.is_done(cfg, tok, data_fp)


def _where(cfg, name: str) -> str:
  """What a skipped stage's "done already" line names."""
  if name == "finetune":
    return workspace.folder(cfg, "teacher")
  if name == "extract":
    return workspace.folder(cfg, "store")
  if name == "calibrate":
    return os.path.join(workspace.folder(cfg, "store"), store.MANIFEST) + " calibration"
  if name == "train":
    return ", ".join(workspace.folder(cfg, "students", s) for s in cfg.students)
  return workspace.folder(cfg, "eval")


def _prune_done(cfg, name: str) -> None:
  """A skipped training stage's runs pruned as `checkpoint.after_done` says (what a kill after
  their done markers left)."""
  if name == "finetune":
    workspace.prune_done(cfg, workspace.folder(cfg, "teacher"))
  elif name == "train":
    for s in cfg.students:
      workspace.prune_done(cfg, workspace.folder(cfg, "students", s))


def _start_over(cfg, name: str) -> None:
  """resume=false: the stage's existing output folder moved aside before it runs. calibrate
  (its output is the manifest of the store extract has just rebuilt) and evaluate (which moves
  eval/ itself, also when run alone) are left to their stages."""
  if name == "finetune":
    workspace.start_over(workspace.folder(cfg, "teacher"))
  elif name == "extract":
    workspace.start_over(workspace.folder(cfg, "store"))
  elif name == "train":
    for s in cfg.students:
      workspace.start_over(workspace.folder(cfg, "students", s))


def run(cfg) -> dict:
  train.run_checks(cfg)  # every student variant name is checked before any work starts
  workspace.check_data(cfg)  # and the splits and batch sizes against the data
  # Each stage is checked just before it would run (after the stages before it), so a stage
  # whose inputs came out the same (e.g. a calibration redone with the same temperatures) is
  # still skipped. timings.json keeps the time a stage took when it did its work: a re-run that
  # skips a done stage keeps the earlier figure rather than the seconds the skip took.
  path = workspace.folder(cfg, "timings.json")
  earlier = {}
  if cfg.resume and os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
  checks, timings, skipped, result = _Checks(cfg), {}, set(), None
  for name, stage in zip(STAGES, (finetune.run, extract.run, calibrate.run, train.run,
                                  evaluate.run)):
    if cfg.resume and checks.is_done(name):
      log.info("%s: done already (%s)", name, _where(cfg, name))
      _prune_done(cfg, name)
      skipped.add(name)
      if name in earlier:
        timings[name] = earlier[name]
      continue
    t0 = time.time()
    log.info("pipeline: %s", name)
    if not cfg.resume:
      _start_over(cfg, name)
    result = stage(cfg)
    timings[name] = round(time.time() - t0, 2)
  if "evaluate" in skipped:
    result = evaluate.report(cfg)  # the stored table, as a run that evaluates prints it
  if jax.process_index() == 0:
    io_util.remove_stale_temps(os.path.dirname(path), ".tmp-timings.json-*")  # a killed write's
    io_util.atomic_write_json(path, timings)
  log.info("pipeline: done (stage seconds, skipped stages as first measured: %s)",
           json.dumps(timings))
  return result


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
