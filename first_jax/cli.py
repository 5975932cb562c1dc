"""Command-line entry points: `python -m first_jax.<stage>` and `first-jax <stage>`.

User errors (bad config key, type, file, value, a workdir in use by another run) print one
line and exit 2; nothing is written before validation passes. SIGTERM stops a training loop at a
step boundary with a checkpoint (exit 143); Ctrl-C exits 130; both resume on a re-run.
`--help` prints the stage's purpose and the config keys it reads (from `config.SCHEMA`) without
starting a JAX backend.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
import sys
import textwrap
from typing import Any, Callable, Sequence

from first_jax.runtime import distributed, log, preemption
from first_jax.runtime.errors import UserError
from first_jax import config as config_lib
from first_jax.engine import workspace
from first_jax.engine.job import Job

STAGES = ("finetune", "extract", "calibrate", "sample", "train", "evaluate", "pipeline")
_HELP = ("-h", "--help")
_WIDTH = 100


def _docstring(stage: str) -> str:
  """The stage module's docstring, read from its source (nothing imported, no JAX)."""
  spec = importlib.util.find_spec(f"first_jax.stages.{stage}")
  if spec is None or not spec.origin:
    return ""
  with open(spec.origin, encoding="utf-8") as f:
    return ast.get_docstring(ast.parse(f.read())) or ""


def stage_purpose(stage: str) -> str:
  """The first paragraph of the stage module's docstring, as one line."""
  return " ".join(_docstring(stage).split("\n\n")[0].split())


def _wrap(text: str, indent: str) -> str:
  return textwrap.fill(text, _WIDTH, initial_indent=indent, subsequent_indent=indent,
                       break_on_hyphens=False, break_long_words=False)


def _footer() -> str:
  return "\n".join([
      _wrap("Overrides: " + config_lib.OVERRIDE_SYNTAX, ""),
      "Every key, with what it means and which stage reads it: docs/config.md.",
      _wrap("Exit codes: 0 done; 2 a bad config or input (one line naming it, nothing written); "
            "130 interrupted, 143 stopped by SIGTERM (re-run the same command to resume).", ""),
  ])


def stage_help(stage: str, prog: str | None = None, purpose: str | None = None) -> str:
  """`--help` of one stage: purpose, the config keys it reads (type, default, allowed values,
  meaning) and the override syntax."""
  prog = prog or f"python -m first_jax.{stage}"
  purpose = stage_purpose(stage) if purpose is None else purpose
  defaults = config_lib.defaults()
  lines = [f"usage: {prog} --config FILE[:ARG] [--config.KEY=VALUE ...]", ""]
  if purpose:
    lines += [_wrap(purpose, ""), ""]
  if stage in STAGES and stage != "pipeline":
    keys = config_lib.keys_for(stage)
    shared = [k for k in keys if set(config_lib.SCHEMA[k].stages) == set(config_lib.STAGES)]
    own = sorted((k for k in keys if k not in shared),  # the most specific first
                 key=lambda k: len(config_lib.SCHEMA[k].stages))
    groups = [(f"Config keys {stage} reads", own),
              ("Config keys every stage reads", shared)]
  else:
    groups = [("Config keys (the pipeline runs every stage: it reads every key)",
               list(config_lib.SCHEMA))]
  for title, keys in groups:
    lines.append(f"{title} (KEY: type = default  [allowed values]):")
    for key in keys:
      spec = config_lib.SCHEMA[key]
      allowed = spec.expected(key)
      head = (f"  {key}: {config_lib.type_name(key)} = "
              f"{config_lib.format_default(defaults[key])}")
      lines.append(head + (f"  [{allowed}]" if allowed else ""))
      lines.append(_wrap(spec.doc, "      "))
    lines.append("")
  lines.append(_footer())
  return "\n".join(lines) + "\n"


def main_help() -> str:
  """`first-jax --help`: the stages and what each does."""
  lines = ["usage: first-jax {" + ",".join(STAGES) + "} --config FILE[:ARG] "
           "[--config.KEY=VALUE ...]", "       first-jax <stage> --help  (the config keys a "
           "stage reads)", "", "Stages (`pipeline` runs the others in order):"]
  for stage in STAGES:
    lines.append(textwrap.fill(stage_purpose(stage), _WIDTH, initial_indent=f"  {stage:10s} ",
                               subsequent_indent=" " * 13, break_on_hyphens=False))
  lines += ["", _footer()]
  return "\n".join(lines) + "\n"


def _stage_of(run: Callable[..., Any]) -> tuple[str, str]:
  """(stage name, module docstring) of a stage's `run`, also when run as `__main__`."""
  module = sys.modules.get(getattr(run, "__module__", ""), None)
  spec = getattr(module, "__spec__", None)
  name = spec.name if spec is not None else getattr(run, "__module__", "")
  return name.rpartition(".")[2], (getattr(module, "__doc__", None) or "")


def _wants_help(argv: Sequence[str]) -> bool:
  return any(a in _HELP for a in argv)


def stage_main(run: Callable[[Job], Any], argv: Sequence[str] | None = None,
               prog: str | None = None) -> int:
  """Loads the config from argv, resolves it (`Job`), runs one stage with it, maps UserError to
  exit code 2."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if _wants_help(argv):  # before anything starts a backend
    stage, doc = _stage_of(run)
    purpose = None if stage in STAGES else " ".join(doc.split("\n\n")[0].split())
    sys.stdout.write(stage_help(stage, prog, purpose))
    return 0
  log.setup()
  try:
    distributed.initialize()  # before the config: validation counts the global devices
    preemption.install()  # after it: on many hosts JAX's preemption service takes SIGTERM
    if distributed.process_info()[1] > 1:
      distributed.log_topology()  # each process's devices, so a bad launch shows at once
    job = Job(config_lib.load(argv))  # the config validated, then resolved once
    with workspace.lock(job.layout.root):  # one run per workdir
      run(job)
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
  if argv and argv[0] in _HELP:
    sys.stdout.write(main_help())
    sys.exit(0)
  if not argv or argv[0] not in STAGES:
    print(f"usage: first-jax {{{','.join(STAGES)}}} --config FILE [--config.key=value ...] "
          f"(first-jax --help lists the stages)", file=sys.stderr)
    sys.exit(2)
  sys.exit(run_stage(argv[0], argv[1:], prog=f"first-jax {argv[0]}"))


def run_stage(stage: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  """`python -m first_jax.<stage>` (and `first-jax <stage>`): `stage_main` of
  first_jax/stages/<stage>.py."""
  if _wants_help(sys.argv[1:] if argv is None else argv):  # without importing JAX
    sys.stdout.write(stage_help(stage, prog))
    return 0
  module = importlib.import_module(f"first_jax.stages.{stage}")
  if stage == "pipeline":
    return stage_main(module.run, argv, prog)
  from first_jax.stages import base  # pylint: disable=import-outside-toplevel
  return stage_main(functools.partial(base.execute, module.STAGE), argv, prog)
