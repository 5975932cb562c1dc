"""Orbax checkpoints of a train state plus the data iterator position.

One `CheckpointManager` per training run (async saves, keep the last N and the best by the
interval's mean training loss). A checkpoint holds the whole `TrainState` (params, optimizer
state, step, RNG, temperature EMA) and, as JSON, the data iterator state, so a killed run resumes
on exactly the batch it would have seen next.

A resume takes the newest step that restores completely (`Checkpointer.restore_newest`): a step
that does not (a file deleted or truncated, unreadable metadata, a data position the iterator
refuses) is moved aside to `<directory>/<step>.damaged-<unix time>`, a name Orbax's step listing
ignores (a step folder is named by digits only), with one warning line, and the next older step
is tried. A save first checks the free disk space (`Checkpointer.check_space`). Once a run is
done (exported, marked), `after_done` keeps what `checkpoint.after_done` says: nothing (the
default: the export holds the weights), the newest step, or every step kept.
"""
from __future__ import annotations

import gc
import glob
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from first_jax.runtime import distributed
from first_jax.runtime.errors import UserError

log = logging.getLogger(__name__)

# Orbax's messages for a checkpoint that is whole but does not fit the restore target (another
# model or another version of the train state): not damage, so never moved aside.
_MISMATCH = ("Structure mismatch", "tree structures do not match",
             "is not compatible with the stored shape")


class Checkpointer:
  """Save/restore (state, data position) at steps under `directory`."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    self._options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._sizes: dict[int, int] = {}  # step -> bytes of its folder (check_space)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, loss: float | None = None,
           force: bool = False) -> None:
    self.check_space(state)
    metrics = None if loss is None else {"loss": float(loss)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        metrics=metrics, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings): (state, data, step)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    log.info("restored step %d from %s", step, self.directory)
    return out["state"], out["data"], step

  def restore_newest(self, abstract_state: Any,
                     accept_data: Callable[[dict], None] | None = None
                     ) -> tuple[Any, dict, int] | None:
    """The newest step that restores completely, as (state, data, step); None if none does.

    `accept_data(data)` (e.g. the batch iterator's `restore`) is part of the test: a data
    position it refuses makes the step damaged. A damaged step is moved aside (one warning line
    naming the folder and the error's first line) and the next older one is tried; when none
    is left, a warning says the run starts over. A whole checkpoint that does not fit
    `abstract_state` (another model or train-state layout) is a UserError, nothing is moved.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    _quiet_orphaned_reads()
    moved = []
    try:
      for i, step in enumerate(steps):
        error = None
        try:
          state, data, _ = self.restore(abstract_state, step)
          if accept_data is not None:
            accept_data(data)
        except Exception as e:  # noqa: BLE001 - any failure to restore marks the step damaged
          if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise  # the checkpoint may be fine; the machine is short of memory
          if any(m in str(e) for m in _MISMATCH):
            raise UserError(
                f"{os.path.join(self.directory, str(step))}: the checkpoint does not fit this "
                f"run's train state ({_first_line(e)}); it was written for another model or "
                f"version: move {self.directory} aside to start over") from None
          error = e
          gc.collect()  # close the failed restore's leftover reads now, while they are quiet
        if distributed.all_processes(error is None):
          return state, data, step
        moved.append(self._move_aside(step, error, (steps[i + 1:] or [None])[0]))
    finally:
      if moved:  # the manager caches its step list: rebuild it without the moved folders
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    log.warning("%s: none of the %d checkpoint steps restores (moved aside); starting from "
                "step 0", self.directory, len(steps))
    return None

  def _move_aside(self, step: int, error: Exception | None, next_step: int | None) -> str:
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{int(time.time())}"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.damaged-{int(time.time())}-{n}", n + 1
    if distributed.is_main():
      try:
        os.rename(src, dst)
      except OSError as e:
        raise UserError(f"{src}: does not restore ({_first_line(error)}) and cannot be moved "
                        f"aside ({e.strerror}); move or delete it, then re-run") from None
    distributed.sync(f"first_jax_checkpoint_move_{step}")
    reason = _first_line(error) if error is not None else "failed on another process"
    then = "no older step" if next_step is None else f"trying step {next_step}"
    log.warning("%s: checkpoint step %d does not restore (%s); moved to %s, %s",
                self.directory, step, reason, dst, then)
    return dst

  def check_space(self, state: Any) -> None:
    """UserError (one line) when the checkpoint filesystem has less free space than a save
    needs: the size of the newest step folder, or the state's bytes before the first save."""
    step, needed = self._newest_step_size()
    what = f"the size of step {step}" if step is not None else "the train state's size"
    if step is None:
      needed = sum(_nbytes(x) for x in jax.tree.leaves(state))
    path = self.directory
    while not os.path.exists(path):  # the folder may not exist before the first save
      path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if not distributed.all_processes(free >= needed):
      raise UserError(f"{self.directory}: not enough free disk space for a checkpoint: needs "
                      f"{needed} bytes ({_human(needed)}, {what}), {free} bytes free "
                      f"({_human(free)}); free some space and re-run to resume")

  def _newest_step_size(self) -> tuple[int | None, int]:
    try:
      names = os.listdir(self.directory)
    except OSError:
      return None, 0
    for step in sorted((int(n) for n in names if n.isdigit()), reverse=True):
      if step not in self._sizes:
        total = _tree_bytes(os.path.join(self.directory, str(step)))
        if total == 0:
          continue
        self._sizes[step] = total
      return step, self._sizes[step]
    return None, 0

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


AFTER_DONE = ("none", "last", "all")


def after_done(directory: str, policy: str) -> int:
  """Prunes a finished run's checkpoints (`policy` in AFTER_DONE); returns the bytes freed.

  "none" removes the folder (renamed first, so a kill midway leaves no half folder that looks
  like checkpoints), "last" keeps only the newest step (state with optimizer moments and data
  position: training can be continued), "all" keeps every step `checkpoint.keep` kept.
  Idempotent, and it finishes what a killed call left (folders renamed `*.deleting-<time>`, not
  yet removed): a run found done prunes again (`workspace.prune_done`), so a kill between the
  done marker and the pruning leaves nothing behind. Process 0 prunes; every process returns
  once it has.
  """
  assert policy in AFTER_DONE, policy
  freed = 0
  if distributed.is_main():
    doomed = []
    if policy != "all" and os.path.isdir(directory):
      steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
      doomed = [directory] if policy == "none" else [
          os.path.join(directory, str(s)) for s in steps[:-1]]
    for path in doomed:
      aside = f"{path}.deleting-{int(time.time())}"
      os.rename(path, aside)
    # this call's and any a killed call left half-removed
    for aside in (glob.glob(f"{glob.escape(directory)}.deleting-*")
                  + glob.glob(os.path.join(glob.escape(directory), "*.deleting-*"))):
      freed += _tree_bytes(aside)
      shutil.rmtree(aside, ignore_errors=True)
  distributed.sync(f"after done: {directory}")
  return freed


def _tree_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:  # removed meanwhile (the keep policy)
        pass
  return total


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target for `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _nbytes(x: Any) -> int:
  try:
    return int(x.nbytes)
  except (AttributeError, TypeError):  # e.g. a ShapeDtypeStruct
    try:
      return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    except (AttributeError, TypeError):  # a typed PRNG key: a few bytes
      return 0


def _first_line(e: BaseException | None, limit: int = 300) -> str:
  """`Type: first line` of an error, without TensorStore's spec dumps. Orbax wraps a failed
  array read in a bare Exception ("Encountered error while reading array index ..."); its
  cause names the file problem, so that is shown instead."""
  if e is None:
    return "unknown error"
  if "See full TensorStore details" in str(e) and e.__cause__ is not None:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [""])[0]
  for tail in (" [tensorstore_spec", " See full TensorStore details"):
    text = text.split(tail)[0]
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _human(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return str(n)


def _from_orbax(exc: BaseException | None) -> bool:
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _OrphanedReadFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not ("exception was never retrieved" in msg
                and ("orbax" in msg or "TensorStore" in msg))


def _quiet_orphaned_reads() -> None:
  """A failed restore leaves Orbax's other reads behind: TensorStore callbacks that find the
  event loop closed, coroutines closed unfinished, futures whose exception nobody took. Python
  prints each (an unraisable exception, or asyncio's "... exception was never retrieved"):
  hundreds of lines after the one warning. Those reports only are dropped, from the first
  resume on."""
  previous = sys.unraisablehook
  if not getattr(previous, "first_jax_filter", False):
    def hook(unraisable):
      exc = unraisable.exc_value
      if ((isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
          or _from_orbax(exc)):
        return
      previous(unraisable)

    hook.first_jax_filter = True
    sys.unraisablehook = hook
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _OrphanedReadFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_OrphanedReadFilter())
