"""Orbax checkpoints of a train state plus the data iterator position.

One `CheckpointManager` per training run (async saves, keep the last N and the best by the
interval's mean training loss). A checkpoint holds the whole `TrainState` (params, optimizer
state, step, RNG, temperature EMA) and, as JSON, the data iterator state, so a killed run resumes
on exactly the batch it would have seen next.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)


class Checkpointer:
  """Save/restore (state, data position) at steps under `directory`."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m["loss"], reverse=True, n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, loss: float | None = None,
           force: bool = False) -> None:
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target for `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
