"""SIGKILL matrix: the smoke pipeline killed at 14 points across finetune, extract, calibrate,
train and evaluate, each re-run with the same command to completion, ends equal to one unbroken
run: evaluation results and per-example events, store records (shard bytes) and calibration,
every export's weights, every step's losses, done markers, and the same files (nothing
half-written or half-deleted left). Slow: about an hour on 2 busy CPU cores (run with -m slow);
its figures are in docs/reliability.md.

Each case runs the pipeline as a subprocess, polls the workdir (and the log) for its trigger and
sends SIGKILL the moment it holds, then checks the kill landed where meant (the trigger still
holds on disk, the stage not finished). A trigger never reached fails the case. A case whose kill
point lies in a later stage starts from a copy of the unbroken run's finished earlier stages
(exactly what an unbroken run has there when the stage starts), so only the stages from the
killed one on run twice. The two windows too short to hit by polling for sure (a store shard's
temp file, an export's safetensors temp file, between their creation and their rename) are held
open: the killed run's process stops itself (SIGSTOP) once the temp file is written, before the
rename, so the kill lands inside the window even when the poll sees the file only then. The
re-run is always the plain `python -m first_jax.pipeline` command.
"""
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file

from first_jax.data import store
from tests.test_multiprocess import ROOT, SMOKE, STEERING

# Same for the unbroken run and every killed / resumed run (the smoke defaults reach every
# trigger: finetune 126 steps, each student 84, checkpoints every 20, metrics every 10).
OVERRIDES = ()
POLL_S = 0.005
RUN_TIMEOUT_S = 3600
RUNS = ("teacher", "students/sft", "students/kd", "students/first")

# The killed run's entry point when a case holds a window open: first_jax.pipeline, with
# io_util.atomic_path stopping the process (SIGSTOP) once a temp path containing
# $KILL_MATRIX_HOLD is written and not yet renamed onto its target.
HOLD_BOOT = r"""
import contextlib, os, runpy, signal, sys
from first_jax.runtime import io_util
from first_jax.data import store
from first_jax.models import hf_io
_atomic_path, _where = io_util.atomic_path, os.environ["KILL_MATRIX_HOLD"]

@contextlib.contextmanager
def held(path):
  with _atomic_path(path) as tmp:
    yield tmp
    if _where in tmp:
      os.kill(os.getpid(), signal.SIGSTOP)

io_util.atomic_path = store.atomic_path = hf_io.atomic_path = held
runpy.run_module("first_jax.pipeline", run_name="__main__", alter_sys=True)
"""


def _env(hold: str | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in STEERING and k != "KILL_MATRIX_HOLD"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             TOKENIZERS_PARALLELISM="false", FIRST_JAX_NO_PROGRESS="1")
  if hold is not None:
    env["KILL_MATRIX_HOLD"] = hold
  return env


def _args(wd: str) -> list[str]:
  return ["--config", SMOKE, f"--config.workdir={wd}", *OVERRIDES]


def command(wd: str) -> list[str]:
  return [sys.executable, "-m", "first_jax.pipeline", *_args(wd)]


def run_to_end(wd: str, log: str) -> tuple[int, float]:
  t0 = time.time()
  with open(log, "w") as f:
    rc = subprocess.run(command(wd), env=_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                        timeout=RUN_TIMEOUT_S).returncode
  return rc, time.time() - t0


# ---- triggers: (workdir, log path) -> bool -------------------------------------------------


def metrics_step(run: str) -> Callable[[str], int]:
  def last(wd: str) -> int:
    try:
      with open(os.path.join(wd, run, "metrics.jsonl")) as f:
        rows = f.read().splitlines()
    except OSError:
      return 0
    steps = [0]
    for r in rows:
      try:
        steps.append(int(json.loads(r)["step"]))
      except (ValueError, KeyError):  # a line being written
        pass
    return max(steps)
  return last


def at_step(run: str, step: int):
  last = metrics_step(run)
  return lambda wd, log: last(wd) >= step


def saving(run: str, min_step: int):
  """An Orbax save of step >= min_step in progress: its temporary folder exists."""
  def trigger(wd, log):
    try:
      names = os.listdir(os.path.join(wd, run, "checkpoints"))
    except OSError:
      return False
    return any(m and int(m.group(1)) >= min_step for m in
               (re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", n) for n in names))
  return trigger


def exists(pattern: str):
  return lambda wd, log: bool(glob.glob(os.path.join(wd, pattern)))


def count(pattern: str, n: int):
  return lambda wd, log: len(glob.glob(os.path.join(wd, pattern))) >= n


def logged(line: str):
  return lambda wd, log: line in _read(log)


def store_shards(n: int):
  def trigger(wd, log):
    m = store.read_manifest(os.path.join(wd, "store"))
    return bool(m and not m.get("complete") and len(m.get("shards", [])) >= n)
  return trigger


def absent(pattern: str):
  return lambda wd, log: not glob.glob(os.path.join(wd, pattern))


# ---- the kill points ----------------------------------------------------------------------

BEFORE_EXTRACT = ("data", "teacher")
BEFORE_TRAIN = BEFORE_EXTRACT + ("store",)
BEFORE_EVALUATE = BEFORE_TRAIN + ("students",)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  stage: str
  what: str  # the trigger, in words
  trigger: Callable
  seed: tuple = ()  # the unbroken run's folders copied in first (finished earlier stages)
  landed: Callable = lambda wd, log: True  # holds after the kill iff it landed where meant
  hold: str | None = None  # a temp path substring the killed run stops at (HOLD_BOOT)


CASES = [
    Case("finetune-step", "finetune", "teacher/metrics.jsonl reaches step 30 (checkpoints at "
         "20, 40)", at_step("teacher", 30), landed=absent("teacher/checkpoints/40")),
    Case("finetune-checkpoint-save", "finetune", "teacher/checkpoints/<step >= 40>"
         ".orbax-checkpoint-tmp* exists (an async save in flight)", saving("teacher", 40)),
    Case("finetune-done", "finetune", "teacher/done.json appears (checkpoints not yet pruned, "
         "extract next)", exists("teacher/done.json"),
         landed=absent("store/manifest.json")),
    Case("extract-shard-write", "extract", "store/.tmp-shard-h000-00001.bin-* exists (shard 0 "
         "recorded, shard 1 written, not renamed)", exists("store/.tmp-shard-h000-00001.bin-*"),
         seed=BEFORE_EXTRACT, hold="store/.tmp-shard-h000-00001.bin-"),
    Case("extract-shard-recorded", "extract", "store/manifest.json lists shard 0, not complete",
         store_shards(1), seed=BEFORE_EXTRACT, landed=store_shards(1)),
    Case("calibrate", "calibrate", 'log line "calibrate: running"', logged("calibrate: running"),
         seed=BEFORE_EXTRACT,
         landed=lambda wd, log: "calibration" not in (store.read_manifest(
             os.path.join(wd, "store")) or {"calibration": 1})),
    Case("train-sft-step", "train", "students/sft/metrics.jsonl reaches step 50 (checkpoints "
         "at 40, 60)", at_step("students/sft", 50), seed=BEFORE_TRAIN,
         landed=absent("students/sft/checkpoints/60")),
    Case("train-kd-checkpoint-save", "train", "students/kd/checkpoints/<step >= 40>"
         ".orbax-checkpoint-tmp* exists", saving("students/kd", 40), seed=BEFORE_TRAIN),
    Case("train-kd-done", "train", "students/kd/done.json appears (checkpoints not yet pruned, "
         "first next)", exists("students/kd/done.json"), seed=BEFORE_TRAIN,
         landed=absent("students/first/done.json")),
    Case("train-first-after-checkpoint", "train", "students/first/checkpoints/60 committed",
         exists("students/first/checkpoints/60"), seed=BEFORE_TRAIN,
         landed=absent("students/first/done.json")),
    Case("train-first-export-write", "train", "students/first/export/.tmp-model.safetensors-* "
         "exists (the weights being written, not renamed)",
         exists("students/first/export/.tmp-model.safetensors-*"),
         seed=BEFORE_TRAIN, hold="students/first/export/.tmp-model.safetensors-"),
    Case("evaluate-first-score", "evaluate", "eval/scores/ gets its first .npz",
         count("eval/scores/*.npz", 1), seed=BEFORE_EVALUATE,
         landed=absent("eval/results.json")),
    Case("evaluate-mid-scores", "evaluate", "eval/scores/ holds 3 of 5 .npz",
         count("eval/scores/*.npz", 3), seed=BEFORE_EVALUATE,
         landed=absent("eval/results.json")),
    Case("evaluate-results-written", "evaluate", "eval/results.json written, eval/done.json not "
         "yet", exists("eval/results.json"), seed=BEFORE_EVALUATE,
         landed=absent("eval/done.json")),
]


# ---- running and comparing ---------------------------------------------------------------


def _read(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()
  except OSError:
    return ""


def run_and_kill(case: Case, wd: str, log: str) -> dict:
  """Starts the pipeline, SIGKILLs it when `case.trigger` holds; what it saw."""
  cmd = (command(wd) if case.hold is None
         else [sys.executable, "-c", HOLD_BOOT, *_args(wd)])
  t0 = time.time()
  with open(log, "w") as f:
    p = subprocess.Popen(cmd, env=_env(case.hold), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)
  try:
    while True:
      if case.trigger(wd, log):
        os.killpg(p.pid, signal.SIGKILL)
        break
      if p.poll() is not None:
        pytest.fail(f"{case.name}: trigger ({case.what}) not reached: the run ended first "
                    f"(exit {p.returncode}); log {log}:\n{_read(log)[-3000:]}")
      if time.time() - t0 > RUN_TIMEOUT_S:
        pytest.fail(f"{case.name}: trigger ({case.what}) not reached in {RUN_TIMEOUT_S} s")
      time.sleep(POLL_S)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()
  assert p.returncode == -signal.SIGKILL, (case.name, p.returncode)  # killed, not finished
  return {"killed_after_s": round(time.time() - t0, 1),
          "landed": bool(case.trigger(wd, log) and case.landed(wd, log)),
          "left_at_kill": leftovers(wd)}


def leftovers(wd: str) -> list[str]:
  """Temp files (io_util's .tmp-*, safetensors' .tmpXXXXXX, Orbax's *.orbax-checkpoint-tmp*),
  half-deleted or moved-aside folders, and checkpoints of finished runs under `wd`."""
  out = []
  for root, dirs, files in os.walk(wd):
    for n in dirs + files:
      rel = os.path.relpath(os.path.join(root, n), wd)
      if (n.startswith(".tmp") or "orbax-checkpoint-tmp" in n or ".deleting-" in n
          or ".damaged-" in n or ".stale-" in n or ".old-" in n):
        out.append(rel)
  for run in RUNS:
    if os.path.exists(os.path.join(wd, run, "done.json")):
      out += [os.path.join(run, n) for n in os.listdir(os.path.join(wd, run))
              if n.startswith("checkpoints")]
  return sorted(set(out))


def files(wd: str) -> set[str]:
  """Every file's path under `wd`, TensorBoard event files aside (a resume opens a new one)."""
  out = set()
  for root, _, names in os.walk(wd):
    if os.path.basename(root) != "tensorboard":
      out.update(os.path.relpath(os.path.join(root, n), wd) for n in names)
  return out


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def _max_diff(a, b, where="") -> float:
  """Largest |a - b| over the numbers of two JSON trees; AssertionError if their shapes differ."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and a.keys() == b.keys(), where
    return max([_max_diff(a[k], b[k], f"{where}/{k}") for k in a] or [0.0])
  if isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), where
    return max([_max_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))] or [0.0])
  if isinstance(a, (int, float)) and not isinstance(a, bool):
    assert isinstance(b, (int, float)) and not isinstance(b, bool), where
    return abs(float(a) - float(b)) if a != b else 0.0
  assert a == b, (where, a, b)
  return 0.0


def losses(run_dir: str) -> dict[int, dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), (run_dir, steps)  # each step once
  return {r["step"]: {k: v for k, v in r.items() if not k.endswith("steps_per_s")} for r in rows}


def compare(ref: str, wd: str) -> dict:
  """Asserts `wd` (resumed) ends equal to `ref` (unbroken); returns what was compared."""
  out = {}
  # evaluation: every metric of every model and set, and the per-example events
  for name in ("results.json", "events.json"):
    a, b = _json(os.path.join(ref, "eval", name)), _json(os.path.join(wd, "eval", name))
    out[f"eval/{name} max diff"] = _max_diff(a, b)
    assert a == b, (name, out)
  # the store: shard bytes (sha256), records, calibration
  ra = store.StoreReader(os.path.join(ref, "store"))
  rb = store.StoreReader(os.path.join(wd, "store"))
  assert [s["sha256"] for s in ra.shards] == [s["sha256"] for s in rb.shards]
  np.testing.assert_array_equal(ra.example_indices, rb.example_indices)
  xa, xb = ra.read(ra.example_indices), rb.read(rb.example_indices)
  for k in xa:
    np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"store {k}")
  assert ra.calibration == rb.calibration
  assert ra.manifest["complete"] and rb.manifest["complete"]
  out["store records"] = int(ra.num_examples)
  # exports (weights exactly), done markers, every step's losses
  for run in RUNS:
    ea = load_file(os.path.join(ref, run, "export", "model.safetensors"))
    eb = load_file(os.path.join(wd, run, "export", "model.safetensors"))
    assert ea.keys() == eb.keys(), run
    for k in ea:
      np.testing.assert_array_equal(ea[k], eb[k], err_msg=f"{run} export {k}")
    assert _json(os.path.join(ref, run, "export", "config.json")) == _json(
        os.path.join(wd, run, "export", "config.json")), run
    assert _json(os.path.join(ref, run, "done.json")) == _json(os.path.join(wd, run, "done.json"))
    assert losses(os.path.join(ref, run)) == losses(os.path.join(wd, run)), run
  done = [_json(os.path.join(w, "eval", "done.json")) for w in (ref, wd)]
  assert done[0] == done[1]
  out["exports"] = len(RUNS)
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One unbroken run of the smoke pipeline: the workdir, its wall time."""
  root = tmp_path_factory.mktemp("kill_matrix")
  wd = str(root / "unbroken")
  rc, seconds = run_to_end(wd, str(root / "unbroken.log"))
  assert rc == 0, _read(str(root / "unbroken.log"))[-3000:]
  assert leftovers(wd) == [], leftovers(wd)
  _report({"case": "unbroken", "wall_s": round(seconds, 1)})
  return wd


def _report(row: dict) -> None:
  """One JSON line per case to $KILL_MATRIX_REPORT when set (the figures in the docs)."""
  path = os.environ.get("KILL_MATRIX_REPORT")
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_killed_pipeline_resumes_to_the_unbroken_result(reference, case, tmp_path):
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  for rel in case.seed:
    shutil.copytree(os.path.join(reference, rel), os.path.join(wd, rel))
  t0 = time.time()
  row = {"case": case.name, "stage": case.stage, "passed": False}
  try:
    row.update(run_and_kill(case, wd, str(tmp_path / "killed.log")))
    assert row["landed"], (case.name, case.what, row)
    rc, seconds = run_to_end(wd, str(tmp_path / "resumed.log"))
    log = _read(str(tmp_path / "resumed.log"))
    row.update(resume_rc=rc, resume_s=round(seconds, 1),
               resumed_at=re.findall(r"\] (\S+): resuming at step (\d+)", log),
               warnings=[l.split("] ", 1)[-1][:200] for l in log.splitlines() if " W " in l],
               left_after_resume=leftovers(wd))
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    # nothing half-written or half-deleted, no checkpoints of a finished run left
    assert row["left_after_resume"] == [], row
    assert files(wd) == files(reference), sorted(files(wd) ^ files(reference))
    row.update(compare(reference, wd))
    row["passed"] = True
  finally:
    row["case_s"] = round(time.time() - t0, 1)
    _report(row)


# ---- what the matrix found, fast: a killed atomic write's temp file is removed by the next one


def test_the_next_store_writer_removes_its_hosts_temp_files_left_by_a_kill(tmp_path):
  spec = store.StoreSpec(k=2, vocab_size=16, seq_len=4)
  mine = [tmp_path / ".tmp-shard-h000-00001.bin-k1ll", tmp_path / ".tmp-manifest.json-k1ll",
          tmp_path / ".tmp-manifest-h000.json-k1ll"]
  other = tmp_path / ".tmp-shard-h001-00001.bin-k1ll"  # another host's: it may be writing it
  for p in mine + [other]:
    p.write_bytes(b"half a shard")
  store.StoreWriter(tmp_path, spec, host_id=0, num_hosts=2)
  assert [p.name for p in mine if p.exists()] == [] and other.exists()


def test_an_export_removes_the_temp_files_a_killed_export_left(tmp_path):
  from first_jax.engine import modelio
  from tests.test_step import tiny

  class NoTokenizer:
    def save_pretrained(self, path):
      pass

  path = tmp_path / "export"
  path.mkdir()
  (path / ".tmp-model.safetensors-k1ll").write_bytes(b"half the weights")  # io_util's
  (path / ".tmpK1llEd").write_bytes(b"half the weights")  # safetensors' save_file's own
  modelio.export(tiny(0), NoTokenizer(), str(path))
  assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
