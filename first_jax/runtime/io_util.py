"""Atomic file writes: write to a temp file in the same folder, fsync, rename."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temp path beside `path`; renames it onto `path` only if the block succeeds."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_stale_temps(folder: str | os.PathLike, *patterns: str) -> list[str]:
  """Removes the temp files that atomic writes in `folder` left when their process was killed
  (SIGKILL, power loss) between creating a temp file and renaming it; returns their paths.
  `patterns`: globs of the temp files' names (default ".tmp-*": every atomic_path temp file;
  ".tmp-NAME-*": those of NAME). Only for a folder no other live process writes to (one the
  workdir lock guards): a live writer's temp file would be removed under it."""
  stale = sorted({p for pattern in patterns or (".tmp-*",)
                  for p in glob.glob(os.path.join(os.fspath(folder), pattern))})
  for p in stale:
    with contextlib.suppress(FileNotFoundError):
      os.remove(p)
  return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def atomic_write_npz(path: str | os.PathLike, **arrays: Any) -> None:
  """np.savez of `arrays` to `path`, atomically."""
  import numpy as np  # local: the rest of this module needs only the standard library
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
