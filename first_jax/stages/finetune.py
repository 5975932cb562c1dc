"""Stage 0: supervised fine-tuning of the teacher (cross-entropy, optional label smoothing).

Writes workdir/teacher/{checkpoints, metrics.jsonl, export/}; the export (HF format) is the
fine-tuned teacher every later stage loads.
"""
from __future__ import annotations

import logging

from first_jax.core import step
from first_jax.engine import workspace
from first_jax.engine.job import Job
from first_jax.stages import base

log = logging.getLogger(__name__)


def is_done(job: Job) -> bool:
  """The teacher is fine-tuned (a served teacher: by whoever serves it)."""
  return (job.cfg.teacher.source == "server"
          or workspace.is_done(job.layout.teacher, job.teacher_fingerprint))


def _where(job: Job) -> str:
  s = job.cfg.teacher.server
  return (f"the teacher is served: {s.model!r} at {s.url}" if job.cfg.teacher.source == "server"
          else job.layout.teacher)


def run(job: Job) -> str:
  out, fp = job.layout.teacher, job.teacher_fingerprint
  train = job.data.splits["train"]  # the data (and its errors) before any model loads
  model = job.init_model("teacher")
  workspace.start_run(out, fp)
  spec = step.LossSpec(kind="ce", label_smoothing=job.cfg.finetune.label_smoothing,
                       answer_only=job.answer_only)
  params = job.train("finetune", out, model, train, spec, job.cfg.finetune, seed=job.seed)
  job.export(model, params, out)
  job.finish_training(out, fp)
  return out


def _prune(job: Job) -> None:
  if job.cfg.teacher.source == "local":
    job.prune_done(job.layout.teacher)


STAGE = base.Stage(
    name="finetune", run=run, is_done=is_done, where=_where,
    outputs=lambda job: [job.layout.teacher], when_done=lambda job: job.layout.teacher,
    prune=_prune)
