"""All stages in order from one config: finetune -> extract -> calibrate -> sample -> train ->
evaluate (sample: only for students that read a sampled store).

Each stage runs through `base.execute`, as it does alone: a stage whose outputs exist and match
the config is skipped with a line "<stage>: done already (...)" (done-markers of the teacher,
the students and the evaluation; the store manifest, complete, of this teacher, data and k; its
calibration fingerprint). A stage is checked just before it would run, after the stages before
it, so one whose inputs came out the same (a calibration redone with the same temperatures) is
still skipped. A killed pipeline resumes where it stopped (finished store shards, training
checkpoints, cached scores). `resume=false` starts over: each stage's existing output folder is
moved aside to `<folder>.old-<unix time>` before the stage runs. workdir/timings.json keeps the
seconds of each stage that did its work (a re-run that skips it keeps the earlier figure).
"""
from __future__ import annotations

import json
import logging
import os

from first_jax.engine.job import Job
from first_jax.stages import base, calibrate, evaluate, extract, finetune, sample, train

log = logging.getLogger(__name__)
ORDER = (finetune.STAGE, extract.STAGE, calibrate.STAGE, sample.STAGE, train.STAGE,
         evaluate.STAGE)
STAGES = tuple(stage.name for stage in ORDER)


def run(job: Job) -> dict:
  train.run_checks(job.cfg)  # every student variant name is checked before any work starts
  job.check_data()  # and the splits and batch sizes against the data
  result = None
  for stage in ORDER:  # one job: the stages share its tokenizer, data and mesh
    result = base.execute(stage, job)
  path = job.layout.timings
  timings = json.load(open(path)) if os.path.exists(path) else {}
  log.info("pipeline: done (stage seconds, skipped stages as first measured: %s)",
           json.dumps({name: timings.get(name) for name in STAGES}))
  return result
