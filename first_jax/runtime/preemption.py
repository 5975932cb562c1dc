"""SIGTERM, what schedulers and TPU preemption send: stop cleanly where the run can resume.

One process: SIGTERM inside a training loop (`step_boundaries`) only sets a flag; the loop
finishes the step it is in, saves a checkpoint at that step and raises `Preempted`. Anywhere
else it raises `Preempted` at once, like Ctrl-C (stages outside the loop write atomically and
skip finished work on a re-run).

Many processes: a host must never stop (or save) alone, since the others would wait for it in
the next collective. There JAX's preemption service owns SIGTERM (its notifier is installed by
`jax.distributed.initialize` and tells the coordination service), and the training loop asks
`stop_agreed(step)` at every step: `multihost_utils.reached_preemption_sync_point`, with the
step number Orbax's checkpoint manager also reports, turns true on every host at the same step
(the first past the furthest host's), wherever the signal landed (one host or all). The loop
then saves together and raises `Preempted` on every host. A SIGTERM that lands outside a
training loop is held by the service until the next training step past it (inference stages
run on; their outputs are kill-safe).
The CLI maps `Preempted` to exit code 143 with a line saying how to resume.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator

log = logging.getLogger(__name__)

_state = {"loops": 0, "requested": False, "service": False}


class Preempted(KeyboardInterrupt):
  """The run was asked to stop (SIGTERM)."""


def _handler(signum, frame) -> None:
  del signum, frame
  if _state["loops"]:
    _state["requested"] = True
  else:
    raise Preempted("SIGTERM")


def install() -> None:
  """Routes SIGTERM: to this module's handler in a one-process run, to JAX's preemption
  service in a multi-process one. Call after `distributed.initialize` (main thread only; the
  handler is a no-op elsewhere)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  _state["service"] = False
  if jax.process_count() > 1:
    try:
      multihost_utils.reached_preemption_sync_point(0)  # raises when the service is off
      _state["service"] = True
      return  # its notifier holds SIGTERM: a Python handler would take the signal from it
    except RuntimeError:
      log.warning("JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM "
                  "stops only the host it reaches, and the others wait for it")
  try:
    signal.signal(signal.SIGTERM, _handler)
  except ValueError:  # not the main thread
    pass


@contextlib.contextmanager
def step_boundaries() -> Iterator[None]:
  """A region where a one-process SIGTERM waits for the loop to reach a step boundary."""
  _state["loops"] += 1
  _state["requested"] = False  # a new loop: an earlier run's request is spent
  try:
    yield
  finally:
    _state["loops"] -= 1


def stop_agreed(step: int) -> bool:
  """True once SIGTERM arrived, at the same `step` on every process: call it at every step of
  a training loop (`step`: the step just finished, as checkpoints number it)."""
  if not _state["service"]:
    return _state["requested"]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.reached_preemption_sync_point(step)
