"""Command-line entry points: `python -m first_jax.<stage>` and `first-jax <stage>`.

User errors (bad config key, type, file, value, a workdir in use by another run) print one
line and exit 2; nothing is written before validation passes. SIGTERM stops a training loop at a
step boundary with a checkpoint (exit 143); Ctrl-C exits 130; both resume on a re-run.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable, Sequence

from first_jax import config as config_lib
from first_jax import distributed, log, preemption, workspace
from first_jax.errors import UserError

STAGES = ("finetune", "extract", "calibrate", "train", "evaluate", "pipeline")


def stage_main(run: Callable[[Any], Any], argv: Sequence[str] | None = None) -> int:
  """Loads the config from argv, runs one stage, maps UserError to exit code 2."""
  argv = sys.argv[1:] if argv is None else list(argv)
  log.setup()
  preemption.install()
  try:
    distributed.initialize()  # before the config: validation counts the global devices
    cfg = config_lib.load(argv)
    with workspace.lock(cfg):  # one run per workdir
      run(cfg)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  except preemption.Preempted as e:
    logging.getLogger(__name__).warning("%s; re-run the same command to resume", e)
    return 143
  except KeyboardInterrupt:
    logging.getLogger(__name__).warning("interrupted; re-run the same command to resume")
    return 130
  return 0


def main(argv: Sequence[str] | None = None) -> None:
  """`first-jax <stage> --config ...`."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in STAGES:
    print(f"usage: first-jax {{{','.join(STAGES)}}} --config FILE [--config.key=value ...]",
          file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(f"first_jax.{argv[0]}")
  sys.exit(stage_main(module.run, argv[1:]))
