"""SIGTERM, what schedulers and TPU preemption send: stop cleanly where the run can resume.

Inside a training loop (`step_boundaries`) the signal only sets a flag: the loop finishes the
step it is in, saves a checkpoint at that step and raises `Preempted`. Anywhere else it raises
`Preempted` at once, like Ctrl-C (stages outside the loop write atomically and skip finished
work on a re-run). The CLI maps it to exit code 143 with a line saying how to resume.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

_state = {"loops": 0, "requested": False}


class Preempted(KeyboardInterrupt):
  """The run was asked to stop (SIGTERM)."""


def _handler(signum, frame) -> None:
  del signum, frame
  if _state["loops"]:
    _state["requested"] = True
  else:
    raise Preempted("SIGTERM")


def install() -> None:
  """Routes SIGTERM here (main thread only; a no-op elsewhere)."""
  try:
    signal.signal(signal.SIGTERM, _handler)
  except ValueError:  # not the main thread
    pass


@contextlib.contextmanager
def step_boundaries() -> Iterator[None]:
  """A region where SIGTERM waits for the loop to reach a step boundary (see `requested`)."""
  _state["loops"] += 1
  _state["requested"] = False  # a new loop: an earlier run's request is spent
  try:
    yield
  finally:
    _state["loops"] -= 1


def requested() -> bool:
  """True once SIGTERM arrived inside `step_boundaries`."""
  return _state["requested"]
