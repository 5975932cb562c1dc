"""Test-wide setup: 8 fake CPU devices so sharding is exercised on any machine."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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
