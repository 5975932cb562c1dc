"""One logging format for every stage, and progress bars with rate and ETA."""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

import tqdm

T = TypeVar("T")
FORMAT = "%(asctime)s %(levelname).1s %(name)s] %(message)s"


def setup(level: int = logging.INFO) -> None:
  """Configures the root logger once (idempotent) and quiets chatty libraries."""
  root = logging.getLogger()
  # Some libraries (orbax) install a root handler at import: one format, one line per record.
  for h in list(root.handlers):
    if not getattr(h, "_first_jax", False):
      root.removeHandler(h)
  if not any(getattr(h, "_first_jax", False) for h in root.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler._first_jax = True  # type: ignore[attr-defined]
    root.addHandler(handler)
  root.setLevel(level)
  for noisy in ("absl", "jax._src", "orbax", "urllib3", "httpx", "filelock"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(it: Iterable[T], desc: str, total: int | None = None, initial: int = 0) -> tqdm.tqdm:
  """tqdm with rate and ETA; plain periodic lines when stderr is not a terminal (CI logs)."""
  interactive = sys.stderr.isatty() and not os.environ.get("CI")
  return tqdm.tqdm(it, desc=desc, total=total, initial=initial, dynamic_ncols=True,
                   mininterval=0.5 if interactive else 10.0, file=sys.stderr,
                   disable=os.environ.get("FIRST_JAX_NO_PROGRESS") == "1")
