"""XLA:CPU options the stages run with, set before JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU hands reductions and elementwise ops to YNNPACK library fusions by
default, and these reduce over a short last axis several times slower than XLA's own loops:
the temperature search over [N, 6] top-5 + tail events ran 7 ms per temperature with them and
3.5 ms without (docs/benchmarks.md). `configure` keeps the library for matrix multiplies only.
It leaves XLA_FLAGS alone when it already sets the option, when $FIRST_JAX_XLA_CPU_DEFAULT=1
(XLA's defaults, e.g. to compare), and on jaxlib versions it was not measured on (an option a
jaxlib does not know aborts it). Only the CPU backend reads it.
"""
import os
from importlib import metadata

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "dot"
MEASURED_ON = ("0.10.",)  # jaxlib versions with this option, measured


def configure() -> bool:
  """Adds OPTION=VALUE to XLA_FLAGS where it applies; whether it did. No effect on a backend
  that has already started."""
  flags = os.environ.get("XLA_FLAGS", "")
  if OPTION in flags or os.environ.get("FIRST_JAX_XLA_CPU_DEFAULT") == "1":
    return False
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return False
  if not version.startswith(MEASURED_ON):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {OPTION}={VALUE}".strip()
  return True
