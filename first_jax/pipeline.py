"""All stages in order from one config: finetune -> extract -> calibrate -> train -> evaluate.

Stages whose outputs exist and match the config are skipped (done-markers for training runs,
finished shards for the store); a killed pipeline resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import time

from first_jax import calibrate, cli, evaluate, extract, finetune, io_util, store, train
from first_jax import workspace

log = logging.getLogger(__name__)


def done_already(cfg) -> set[str]:
  """The stages a run of `cfg` would skip: their outputs exist and match the config."""
  if not finetune.is_done(cfg):
    return set()
  path = os.path.join(workspace.folder(cfg, "store"), store.MANIFEST)
  if not os.path.exists(path):
    return {"finetune"}
  with open(path) as f:
    m = json.load(f)
  if not (m.get("complete") and m.get("teacher", {}).get("fingerprint")
          == workspace.teacher_fingerprint(cfg) and m.get("calibration")):
    return {"finetune"}
  if not all(train.is_done(cfg, v) for v in train.run_checks(cfg)):
    return {"finetune", "extract"}
  return {"finetune", "extract", "train"}


def run(cfg) -> dict:
  train.run_checks(cfg)  # every student variant name is checked before any work starts
  # timings.json keeps the time a stage took when it did its work: a re-run that skips a done
  # stage keeps the earlier figure rather than writing the seconds the skip took.
  path = workspace.folder(cfg, "timings.json")
  skipped = done_already(cfg)
  timings = {}
  if skipped and os.path.exists(path):
    with open(path) as f:
      timings = {k: v for k, v in json.load(f).items() if k in skipped}
  for name, stage in (("finetune", finetune.run), ("extract", extract.run),
                      ("calibrate", calibrate.run), ("train", train.run),
                      ("evaluate", evaluate.run)):
    t0 = time.time()
    log.info("pipeline: %s", name)
    result = stage(cfg)
    if name not in timings:
      timings[name] = round(time.time() - t0, 2)
  io_util.atomic_write_json(path, timings)
  log.info("pipeline: done (stage seconds, skipped stages as first measured: %s)",
           json.dumps(timings))
  return result


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
