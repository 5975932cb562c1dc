"""first_jax.xla_cpu: the XLA:CPU option the stages set, and when they leave XLA_FLAGS alone."""
import os
import subprocess
import sys

import pytest

from first_jax import xla_cpu


@pytest.fixture
def env(monkeypatch):
  monkeypatch.delenv("FIRST_JAX_XLA_CPU_DEFAULT", raising=False)
  monkeypatch.setattr(xla_cpu.metadata, "version", lambda name: "0.10.2")
  return monkeypatch


def test_adds_the_option_to_the_flags_already_there(env):
  env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert xla_cpu.configure()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot")
  assert not xla_cpu.configure()  # once


@pytest.mark.parametrize("flags, default, version", [
    ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce", None, "0.10.2"),  # the user's own
    ("", "1", "0.10.2"),  # FIRST_JAX_XLA_CPU_DEFAULT=1
    ("", None, "0.12.0"),  # a jaxlib it was not measured on
])
def test_leaves_the_flags_alone(env, flags, default, version):
  env.setenv("XLA_FLAGS", flags)
  if default:
    env.setenv("FIRST_JAX_XLA_CPU_DEFAULT", default)
  env.setattr(xla_cpu.metadata, "version", lambda name: version)
  assert not xla_cpu.configure()
  assert os.environ["XLA_FLAGS"] == flags


def test_this_jaxlib_accepts_the_option_when_it_is_set():
  """A fresh process with the option compiles and runs a reduction (an unknown option aborts)."""
  code = ("import os; from first_jax import xla_cpu; os.environ.pop('XLA_FLAGS', None); "
          "set_ = xla_cpu.configure(); import jax.numpy as jnp; "
          "print(set_, float(jnp.log(jnp.exp(jnp.arange(6.0)).sum())))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items()
                            if k != "FIRST_JAX_XLA_CPU_DEFAULT"})
  assert out.returncode == 0, out.stderr[-2000:]
  applied, value = out.stdout.split()
  assert abs(float(value) - 5.4561934) < 1e-5
  assert applied == str(xla_cpu.metadata.version("jaxlib").startswith(xla_cpu.MEASURED_ON))
