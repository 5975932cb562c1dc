"""Where the README job's time goes (issue 11, item 6), before and after the speed work.

    python -m bench.demo_time --out docs/benchmarks/demo_time.json [--variants before,after]
    python -m bench.demo_time --padding-only        # the padded shares alone, in seconds

Runs command (1)'s job (`python -m first_jax.pipeline --config configs/demo.py`) once per
variant, each in a fresh workdir, one after the other on an otherwise idle machine, and records
the seconds per stage (the pipeline's timings.json), the command's wall-clock (start-up and
asset loading included), and the share of padded positions in the batches each stage computes
on, counted by the same batching code the stages use (data.BatchIterator with the stage's
length buckets, and the evaluation's shortest-first order cut by data.trim_batch):
  before   configs/demo.py with `finetune.length_buckets=()` and `distill.length_buckets=()`:
           every batch at data.max_len (96), as the job ran before the buckets were its default
  after    configs/demo.py as it is
  shipped  configs/demo.py as it is, the variant README's time claim cites (`after` and
           `before` were recorded on 2026-12-02, when the job still ran on BIG-bench multiemo)
  shipped_float32  the same job computing in float32 (`*.model.dtype=float32`), the job as
           shipped before 2026-12-06's mixed precision
A variant whose record is already in --out is not run again (a killed run resumes by variant);
`--force` runs it anyway. Progress: the pipeline's own (rate and ETA per stage).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.common import ROOT, environment, log

CONFIG = "configs/demo.py"
STAGES = ("finetune", "extract", "calibrate", "train", "evaluate")
VARIANTS = {"before": {"finetune.length_buckets": (), "distill.length_buckets": ()},
            "after": {}, "shipped": {},
            "shipped_float32": {"teacher.model.dtype": "float32", "student.model.dtype": "float32"}}


def flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _share(real: int, cells: int) -> dict[str, Any]:
  return {"real_tokens": int(real), "positions": int(cells),
          "padded_share": round(1.0 - real / cells, 4) if cells else None}


def _train_share(arrays: dict, optim, seed: int) -> dict[str, Any]:
  """Padded share of every training batch of a run (all epochs), as trainer.train_model
  batches: shuffled, remainder dropped, trimmed to its buckets."""
  from first_jax.data import batches as data_lib
  it = data_lib.BatchIterator({"input_ids": arrays["input_ids"],
                               "attention_mask": arrays["attention_mask"]},
                              optim.batch_size, seed=seed, shuffle=True, drop_remainder=True,
                              num_epochs=optim.epochs, trim=True,
                              length_buckets=tuple(optim.length_buckets))
  real = cells = 0
  for b in it:
    real += int(b["attention_mask"].sum())
    cells += b["attention_mask"].size
  return _share(real, cells)


def _scored_share(sets: list[dict], batch_size: int, buckets: tuple[int, ...],
                  shortest_first: bool) -> dict[str, Any]:
  """Padded share of scoring every row of `sets` as infer.map_rows batches them (in order or
  shortest first, the last batch filled with copies, each batch trimmed to `buckets`)."""
  from first_jax.data import batches as data_lib
  real = cells = 0
  for arrays in sets:
    mask = arrays["attention_mask"]
    order = np.argsort(mask.sum(-1), kind="stable") if shortest_first else np.arange(len(mask))
    rows = {"input_ids": mask[order], "attention_mask": mask[order]}
    for b in data_lib.BatchIterator(rows, batch_size, seed=0, shuffle=False,
                                    drop_remainder=False, num_epochs=1):
      b = data_lib.trim_batch(b, buckets)
      real += int(b["attention_mask"].sum())
      cells += b["attention_mask"].size
  return _share(real, cells)


def padding(overrides: dict[str, Any]) -> dict[str, Any]:
  """The padded share of each stage's batches for configs/demo.py with `overrides`."""
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  cfg = config_lib.load_file(os.path.join(ROOT, CONFIG))
  for key, value in overrides.items():  # dotted keys, any depth (`teacher.model.dtype`)
    *path, name = key.split(".")
    block = cfg
    for part in path:
      block = block[part]
    block[name] = value
  data = Job(cfg).data
  train_N = data.splits["train"]
  student_seed = cfg.distill.seed if cfg.distill.seed >= 0 else cfg.seed
  evaluated = [data.splits["validation"], data.splits["test"], *data.ood.values()]
  buckets = tuple(cfg.distill.length_buckets)
  return {
      "finetune": _train_share(train_N, cfg.finetune, cfg.seed),
      "extract": _scored_share([train_N], cfg.extract.batch_size, (), False),
      "train (each student)": _train_share(train_N, cfg.distill, student_seed),
      "evaluate (validation, test, out-of-domain; each model)": _scored_share(
          evaluated, cfg.evaluate.batch_size, buckets, bool(buckets)),
      "rows": {"train": len(train_N["input_ids"]),
               "evaluated": int(sum(len(a["input_ids"]) for a in evaluated)),
               "max_len": int(cfg.data.max_len)},
  }


def run_variant(name: str, workdir: str) -> dict[str, Any]:
  wd = os.path.join(workdir, name)
  shutil.rmtree(wd, ignore_errors=True)  # a fresh run: stage times of one uninterrupted run
  cmd = [sys.executable, "-m", "first_jax.pipeline", "--config", CONFIG,
         f"--config.workdir={wd}", *flags(VARIANTS[name])]
  log(f"{name}: {' '.join(cmd[1:])}")
  t0 = time.time()
  subprocess.run(cmd, cwd=ROOT, check=True)
  wall = time.time() - t0
  with open(os.path.join(wd, "timings.json")) as f:
    stages = json.load(f)
  missing = [s for s in STAGES if s not in stages]
  if missing:
    raise SystemExit(f"{wd}/timings.json: no seconds for stage(s) {missing}")
  with open(os.path.join(wd, "eval", "results.json")) as f:
    results = json.load(f)
  return {"command": " ".join(["python", *cmd[1:]]), "stage_s": stages,
          "stages_total_s": round(sum(stages[s] for s in STAGES), 1),
          "wall_s": round(wall, 1), "results": results}


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="docs/benchmarks/demo_time.json")
  ap.add_argument("--variants", default="before,after")
  ap.add_argument("--workdir", default="workdir/bench_demo")
  ap.add_argument("--force", action="store_true", help="run variants already in --out again")
  ap.add_argument("--padding-only", action="store_true",
                  help="print the padded shares of both variants; run nothing")
  args = ap.parse_args(argv)
  args.variants = tuple(v for v in args.variants.split(",") if v)
  bad = [v for v in args.variants if v not in VARIANTS]
  if bad or not args.variants:
    ap.error(f"--variants: {bad or 'none'} (expected some of {','.join(VARIANTS)})")
  return args


def main(argv=None) -> int:
  args = parse(argv)
  if args.padding_only:
    print(json.dumps({v: padding(VARIANTS[v]) for v in args.variants}, indent=1))
    return 0
  record = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      record = json.load(f)
  record.setdefault("variants", {})
  for v in args.variants:
    if v in record["variants"] and not args.force:
      log(f"{v}: in {args.out} already (--force runs it again)")
      continue
    env = environment()
    got = run_variant(v, args.workdir)
    record["variants"][v] = {"overrides": flags(VARIANTS[v]), "environment": env, **got,
                             "padding": padding(VARIANTS[v])}
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, args.out)  # each variant's record kept as soon as it exists
    log(f"{v}: {got['stages_total_s']} s in stages, {got['wall_s']} s wall -> {args.out}")
  done = record["variants"]
  if "before" in done and "after" in done:
    b, a = done["before"], done["after"]
    record["speedup"] = {s: round(b["stage_s"][s] / a["stage_s"][s], 3) for s in STAGES}
    record["speedup"]["stages_total"] = round(b["stages_total_s"] / a["stages_total_s"], 3)
    record["speedup"]["wall"] = round(b["wall_s"] / a["wall_s"], 3)
    with open(args.out + ".tmp", "w") as f:
      json.dump(record, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(record["speedup"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
