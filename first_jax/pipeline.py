"""All stages in order from one config: finetune -> extract -> calibrate -> train -> evaluate.

Stages whose outputs exist and match the config are skipped (done-markers for training runs,
finished shards for the store); a killed pipeline resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import time

from first_jax import calibrate, cli, evaluate, extract, finetune, io_util, train, workspace

log = logging.getLogger(__name__)


def run(cfg) -> dict:
  train.run_checks(cfg)  # every student variant name is checked before any work starts
  timings = {}
  for name, stage in (("finetune", finetune.run), ("extract", extract.run),
                      ("calibrate", calibrate.run), ("train", train.run),
                      ("evaluate", evaluate.run)):
    t0 = time.time()
    log.info("pipeline: %s", name)
    result = stage(cfg)
    timings[name] = round(time.time() - t0, 2)
  io_util.atomic_write_json(workspace.folder(cfg, "timings.json"), timings)
  log.info("pipeline: done in %.1f s (%s)", sum(timings.values()), json.dumps(timings))
  return result


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
