"""Test-wide setup: 8 fake CPU devices so sharding is exercised on any machine."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the session: the many tests that run the same stages again (resume,
# re-run, damaged copies of one run) compile each program once. A fresh folder per session.
_XLA_CACHE = tempfile.mkdtemp(prefix="first_jax_xla_cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import pytest  # noqa: E402

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "smoke.py")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
  """One finished smoke pipeline run, shared: tests read it, or damage a copy of it."""
  from first_jax import cli
  from first_jax.stages import pipeline
  wd = str(tmp_path_factory.mktemp("smoke"))
  assert cli.stage_main(pipeline.run, ["--config", SMOKE, f"--config.workdir={wd}"]) == 0
  return wd
