"""Multi-process start-up: one `jax.distributed.initialize` per process, chosen from the env.

Every stage calls `initialize()` first (from `cli.stage_main`), before anything touches a JAX
backend. What it does is read from the environment, in this order:

  FIRST_JAX_DISTRIBUTED=off|0        never initialize (one process, whatever else is set)
  FIRST_JAX_COORDINATOR=host:port    explicit (any machine): with FIRST_JAX_NUM_PROCESSES and
  FIRST_JAX_NUM_PROCESSES=N          FIRST_JAX_PROCESS_ID; jax's own cluster detection is off, so
  FIRST_JAX_PROCESS_ID=i             nothing else is guessed (JAX_LOCAL_DEVICE_IDS still applies)
  SLURM_NTASKS>1 (inside srun)       jax's Slurm detection; one task per node sees all its GPUs
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with >1 host: jax's Cloud TPU detection
  FIRST_JAX_DISTRIBUTED=on|1         always initialize, letting jax detect the cluster (Cloud TPU
                                     VM pods via the metadata server, Slurm, Open MPI)
  otherwise                          a single process: nothing to do

FIRST_JAX_INIT_TIMEOUT (seconds, default 300) bounds the wait for the other processes.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

from first_jax.runtime.errors import UserError

logger = logging.getLogger(__name__)

_MODES = {"auto": "auto", "": "auto", "on": "on", "1": "on", "true": "on",
          "off": "off", "0": "off", "false": "off"}
_EXPLICIT = ("FIRST_JAX_COORDINATOR", "FIRST_JAX_NUM_PROCESSES", "FIRST_JAX_PROCESS_ID")
_NO_GPUS = ("", "NoDevFiles", "-1")  # values Slurm / users put in CUDA_VISIBLE_DEVICES for "none"


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the others: keyword arguments for `jax.distributed.initialize`."""
  source: str  # explicit | slurm | tpu | forced
  kwargs: dict[str, Any]
  note: str = ""  # a warning worth logging (e.g. how many GPUs a process will see)


def _int(env: Mapping[str, str], name: str, lo: int) -> int:
  raw = env[name].strip()
  try:
    value = int(raw)
  except ValueError:
    raise UserError(f"{name}: expected an integer, got {raw!r}") from None
  if value < lo:
    raise UserError(f"{name}: expected an integer >= {lo}, got {value}")
  return value


def _coordinator(env: Mapping[str, str]) -> str:
  raw = env["FIRST_JAX_COORDINATOR"].strip()
  host, sep, port = raw.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"FIRST_JAX_COORDINATOR: expected host:port (port 1..65535), got {raw!r}")
  return raw


def _explicit(env: Mapping[str, str], mode: str, timeout: int) -> Plan | None:
  missing = [n for n in _EXPLICIT if not env.get(n, "").strip()]
  if missing:
    given = ", ".join(n for n in _EXPLICIT if n not in missing)
    raise UserError(f"{missing[0]}: required when {given} is set "
                    f"(set all of {', '.join(_EXPLICIT)})")
  num = _int(env, "FIRST_JAX_NUM_PROCESSES", 1)
  pid = _int(env, "FIRST_JAX_PROCESS_ID", 0)
  if pid >= num:
    raise UserError(f"FIRST_JAX_PROCESS_ID: expected 0..{num - 1} "
                    f"(FIRST_JAX_NUM_PROCESSES={num}), got {pid}")
  coordinator = _coordinator(env)
  if num == 1 and mode != "on":
    return None
  # "deactivate": with all three given, jax must not fill local_device_ids from Slurm/MPI.
  return Plan("explicit", dict(coordinator_address=coordinator, num_processes=num,
                               process_id=pid, cluster_detection_method="deactivate",
                               initialization_timeout=timeout))


def _slurm(env: Mapping[str, str], timeout: int) -> Plan:
  if not env.get("SLURM_STEP_NODELIST"):
    raise UserError("SLURM_NTASKS: >1 tasks but not inside an srun step; start the stage with "
                    "`srun python -m first_jax.<stage> ...` (or set FIRST_JAX_DISTRIBUTED=off)")
  kwargs: dict[str, Any] = dict(cluster_detection_method="slurm",
                                initialization_timeout=timeout)
  note = ""
  ntasks = _int(env, "SLURM_NTASKS", 1)
  nodes = _int(env, "SLURM_STEP_NUM_NODES", 1) if env.get("SLURM_STEP_NUM_NODES") else 0
  # jax's Slurm default is ONE GPU per task (local id); with one task per node we want them all.
  if nodes == ntasks and not env.get("JAX_LOCAL_DEVICE_IDS"):
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in _NO_GPUS:
      kwargs["local_device_ids"] = list(range(len(visible.split(","))))
    else:
      note = ("one Slurm task per node but CUDA_VISIBLE_DEVICES is unset: on GPUs each process "
              "would see only GPU 0; export JAX_LOCAL_DEVICE_IDS=0,1,...")
  return Plan("slurm", kwargs, note)


def plan_from_env(env: Mapping[str, str]) -> Plan | None:
  """What `initialize` would do in `env` (None: single process). Pure: reads only `env`."""
  raw_mode = env.get("FIRST_JAX_DISTRIBUTED", "auto")
  mode = _MODES.get(raw_mode.strip().lower())
  if mode is None:
    raise UserError(f"FIRST_JAX_DISTRIBUTED: expected auto, on or off, got {raw_mode!r}")
  if mode == "off":
    return None
  timeout = _int(env, "FIRST_JAX_INIT_TIMEOUT", 1) if env.get("FIRST_JAX_INIT_TIMEOUT") else 300
  if any(env.get(n, "").strip() for n in _EXPLICIT):
    return _explicit(env, mode, timeout)
  if env.get("SLURM_NTASKS", "").strip() and _int(env, "SLURM_NTASKS", 1) > 1:
    return _slurm(env, timeout)
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return Plan("tpu", dict(initialization_timeout=timeout))
  if mode == "on":
    return Plan("forced", dict(initialization_timeout=timeout))
  return None


def initialize() -> None:
  """Joins the other processes of a multi-process run (once); does nothing on a single process.

  Must run before any JAX computation or device query. Raises UserError for a bad environment.
  """
  if jax.distributed.is_initialized():
    return
  plan = plan_from_env(os.environ)
  if plan is None:
    return
  if plan.note:
    logger.warning("%s", plan.note)
  # Cross-process collectives on the CPU backend need an implementation (gloo ships with jaxlib).
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  shown = {k: v for k, v in plan.kwargs.items() if k != "initialization_timeout"}
  logger.info("jax.distributed.initialize via %s %s", plan.source, shown or "(auto-detect)")
  jax.distributed.initialize(**plan.kwargs)


def process_info() -> tuple[int, int]:
  """(this process's index, number of processes)."""
  return jax.process_index(), jax.process_count()


def is_main() -> bool:
  """True on process 0, the one that writes shared files (merged manifests, plots, reports)."""
  return jax.process_index() == 0


def all_processes(flag: bool) -> bool:
  """True when `flag` holds on every process (a collective: every host takes the same branch)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.asarray([flag]))))


def sync(name: str) -> None:
  """Barrier: every process waits here until all reach `name` (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # public API; imported lazily (heavier)
    multihost_utils.sync_global_devices(name)


def log_topology() -> dict[int, dict[str, int]]:
  """Logs this process's devices and (on process 0) every process's; returns that table.

  Returns {process_index: {platform: device count}} over all global devices.
  """
  table: dict[int, dict[str, int]] = collections.defaultdict(dict)
  counts = collections.Counter((d.process_index, d.platform) for d in jax.devices())
  for (proc, platform), n in sorted(counts.items()):
    table[proc][platform] = n
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  index, count = process_info()
  logger.info("process %d/%d: %d local device(s) (%s), %d global", index, count, len(local),
              ", ".join(kinds), jax.device_count())
  if is_main() and count > 1:
    for proc, platforms in sorted(table.items()):
      logger.info("  process %d: %s", proc,
                  ", ".join(f"{n} {p}" for p, n in sorted(platforms.items())))
  return dict(table)
