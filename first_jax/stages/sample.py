"""Stage 2b (between calibrate and train): the sampled stores of the students that read one.

A student `kd-sampled` or `first-sampled` (offline) trains on a priority sample of the teacher's
full next-token distribution at its temperature (first_jax.core.sampled): U =
`extract.samples` distinct tokens per scored position with their exact log-probabilities and
the sample's threshold. FIRST's temperature is known only once calibrate has searched it, so
the draws come after calibration, from the teacher directly (a second pass over the training
split, one per temperature: T = 1 for kd-sampled, the calibrated log_space T for
first-sampled), not by re-weighting the top-k store, which holds too little of the
distribution to re-weight. Teacher forward and sampling run in one jitted program per batch,
shards resume as the top-k store's do, and each position's draw depends only on its example,
its position and `extract.sample_seed`. With no such student, the stage has nothing to do.
"""
from __future__ import annotations

import logging

from first_jax.engine import infer
from first_jax.engine.job import Job
from first_jax.stages import base, extract, train

log = logging.getLogger(__name__)


def temperatures(job: Job) -> list[float]:
  """The teacher temperatures of the offline sampled students, each once."""
  ts = {train.teacher_temperature(job, v.spec) for v in train.run_checks(job.cfg)
        if v.spec.kind == "sampled_kd" and not v.spec.online}
  return sorted(ts)


def _done(job: Job, t: float) -> bool:
  return extract.store_is_done(job, job.layout.sampled(t), job.cfg.extract.samples,
                               train.sampling(job, t))


def is_done(job: Job) -> bool:
  return all(_done(job, t) for t in temperatures(job))


def run(job: Job) -> list[str]:
  c, out = job.cfg.extract, []
  for t in temperatures(job):
    path = job.layout.sampled(t)
    if _done(job, t):
      log.info("sample: %s done already", path)
    else:
      program = lambda module, params, mesh, t=t: infer.sample_program(
          module, params, c.samples, t, c.sample_seed, job.answer_only, mesh)
      job.data  # the data (and its errors) before the teacher loads
      extract.write_store(job, path, c.samples, extract.local_targets(job, program, True),
                          train.sampling(job, t), f"sample t={t:.4g}")
    out.append(path)
  return out


def _paths(job: Job) -> list[str]:
  return [job.layout.sampled(t) for t in temperatures(job)]


STAGE = base.Stage(
    name="sample", run=run, is_done=is_done,
    where=lambda job: ", ".join(_paths(job)) or "no sampled student",
    outputs=_paths, when_done=_paths)
