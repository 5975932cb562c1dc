"""A run's workdir: its layout, the fingerprints and done-markers of its stages, the lock.

    workdir/
      data/split.json             split record (indices + hashes per split), data fingerprint
      teacher/                    fine-tuning run (checkpoints/, metrics.jsonl) + export/ (HF)
      store/                      top-k store (manifest.json, shards), calibration_<mode>.png,
                                  topk_mass.png
      sampled/t<T>/               a sampled store at teacher temperature T (sample stage)
      students/<variant>/         one training run per student variant + export/
      eval/                       results.json, results.md, reliability PNGs
      timings.json                seconds of each stage that did its work
Each stage folder gets a done.json holding the fingerprint of the config it ran with, so the
pipeline skips stages that are done and re-runs those whose inputs changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Iterator

import ml_collections

from first_jax.runtime import checkpoint, distributed, io_util
from first_jax.runtime.errors import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's stages write (the tree above), under the absolute `root`."""
  root: str

  @classmethod
  def of(cls, workdir: str) -> "Layout":
    return cls(os.path.abspath(workdir))

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def teacher(self) -> str:
    return self.path("teacher")

  @property
  def store(self) -> str:
    return self.path("store")

  def sampled(self, t: float) -> str:
    """The sampled store of teacher temperature `t` (6 significant digits name it; its
    manifest holds t itself)."""
    return self.path("sampled", f"t{t:.6g}")

  @property
  def eval(self) -> str:
    return self.path("eval")

  def student(self, variant: str) -> str:
    return self.path("students", variant)

  @property
  def split_record(self) -> str:
    return self.path("data", "split.json")

  @property
  def timings(self) -> str:
    return self.path("timings.json")


def fingerprint(*blocks: Any) -> str:
  """sha256 of config blocks (ConfigDicts or plain values), for done-markers."""
  def plain(x):
    return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x
  text = json.dumps([plain(b) for b in blocks], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_marker(marker: str) -> tuple[dict | None, str | None]:
  """(the JSON object in `marker`, None) or (None, why it is damaged): not JSON, not UTF-8, not
  an object, or no string "fingerprint". A missing file is (None, None)."""
  try:
    with open(marker, "rb") as f:
      obj = json.loads(f.read().decode())
  except FileNotFoundError:
    return None, None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    return None, f"not valid JSON ({(str(e).splitlines() or [type(e).__name__])[0]})"
  if not isinstance(obj, dict):
    return None, f"expected a JSON object, got {type(obj).__name__}"
  if not isinstance(obj.get("fingerprint"), str):
    return None, "no \"fingerprint\" string"
  return obj, None


_warned: set[tuple[str, int, int]] = set()  # damaged markers already reported (path, mtime, size)


def done_fingerprint(path: str) -> str | None:
  """The fingerprint in `path`/done.json; None when absent, or damaged (one warning naming it:
  the run counts as not done and its stage runs again, resuming from its checkpoints)."""
  marker = os.path.join(path, "done.json")
  obj, damage = _read_marker(marker)
  if damage is not None:
    st = os.stat(marker)
    if (marker, st.st_mtime_ns, st.st_size) not in _warned:
      _warned.add((marker, st.st_mtime_ns, st.st_size))
      log.warning("%s: damaged (%s); treated as not done, the stage runs again", marker, damage)
    return None
  return None if obj is None else obj["fingerprint"]


def is_done(path: str, fp: str) -> bool:
  """Whether `path` holds a finished run of fingerprint `fp` (see `done_fingerprint`)."""
  return done_fingerprint(path) == fp


def mark_done(path: str, fp: str, **info: Any) -> None:
  """Written by process 0; every process leaves only once it is there."""
  if distributed.is_main():
    io_util.atomic_write_json(os.path.join(path, "done.json"), {"fingerprint": fp, **info})
  distributed.sync(f"done:{path}")


def finish_training(path: str, fp: str, policy: str, **info: Any) -> None:
  """Marks a training run done (after its export), then prunes its checkpoints as `policy`
  (`checkpoint.after_done`) says (none by default: the optimizer state is not kept past done)."""
  mark_done(path, fp, **info)
  prune_done(path, policy)


def prune_done(path: str, policy: str) -> None:
  """Prunes the checkpoints of the finished training run at `path` as `policy`
  (`checkpoint.after_done`) says; also called for a run found done, which finishes a pruning a
  kill interrupted (or one a re-run's policy now asks for)."""
  freed = checkpoint.after_done(os.path.join(path, "checkpoints"), policy)
  if freed:
    log.info("%s: done; checkpoints pruned (checkpoint.after_done=%s), %.1f MB freed", path,
             policy, freed / 1e6)


def start_run(path: str, fp: str) -> None:
  """Claims `path` for a training run of fingerprint `fp`.

  A folder left by a run of another config (its checkpoints must not be resumed into this one)
  is moved aside to `<path>.stale-<its fingerprint>`; a folder of the same config is kept, so
  the run resumes from its checkpoints.
  """
  if distributed.is_main():  # process 0 claims the folder for every process
    _claim(path, fp)
  distributed.sync(f"start:{path}")


def _claim(path: str, fp: str) -> None:
  marker = os.path.join(path, "run.json")
  if os.path.exists(path) and os.listdir(path):
    obj, damage = _read_marker(marker)
    old = obj["fingerprint"] if obj is not None else None
    if old == fp:
      return
    safe = old is not None and old.replace("-", "").replace("_", "").isalnum()
    aside = f"{path}.stale-{old if safe else 'unknown'}"
    if os.path.exists(aside):
      aside += f"-{int(time.time())}"
    if damage is not None:
      log.warning("%s: damaged (%s); its run is treated as another config's and moved to %s",
                  marker, damage, aside)
    else:
      log.warning("%s holds a run of another config; moved to %s", path, aside)
    os.rename(path, aside)
  io_util.atomic_write_json(marker, {"fingerprint": fp})


def start_over(path: str) -> str | None:
  """`resume=false`: moves a stage's existing output folder aside to `<path>.old-<unix time>`
  (one warning saying where) so the stage starts from nothing; returns where it went, or None
  when there was nothing to move. Process 0 moves it; every process leaves once it is moved."""
  aside = None
  if os.path.exists(path) and os.listdir(path):
    aside = base = f"{path}.old-{int(time.time())}"
    n = 1
    while os.path.exists(aside):  # two stages, or two runs, within one second
      n += 1
      aside = f"{base}-{n}"
    if distributed.is_main():
      os.rename(path, aside)
      log.warning("resume=false: moved %s to %s; the stage starts over", path, aside)
  distributed.sync(f"start_over:{path}")
  return aside


@contextlib.contextmanager
def lock(root: str) -> Iterator[None]:
  """Holds `<root>/.lock` (the workdir's; an flock, released by the OS when the process dies: no stale
  locks) for one run; a second run on the workdir is a UserError naming the holder. Taken by
  process 0 only (the other hosts of a multi-host run share its workdir). A workdir this run
  created and left empty (e.g. a config error found by a stage's own checks) is removed."""
  if not distributed.is_main():
    yield
    return
  root = os.path.abspath(root)
  path = os.path.join(root, ".lock")
  created = not os.path.exists(root)
  try:
    os.makedirs(root, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"config.workdir: cannot create {path} ({e.strerror})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise UserError(f"config.workdir: {os.path.dirname(path)} is in use by {holder}; wait for "
                      f"that run to end or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the flock
    if created and os.listdir(root) == [".lock"]:  # a run that wrote nothing leaves nothing
      os.remove(path)
      os.rmdir(root)
