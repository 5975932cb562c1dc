"""Preemption on many hosts, for real: the smoke teacher fine-tuning as 2 processes x 4 CPU
devices, SIGTERM sent mid-training to ONE process (and, second case, to both). Every process
must stop at the same step, save one checkpoint together and exit 143 within a bounded time;
the same 2-process command then resumes to the end and must equal an unbroken 2-process run
(the exported weights, every logged step's loss but the interval the stop split). Slow: about 10 minutes on 2 CPU cores (run with
-m slow); its figures are in docs/reliability.md."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.test_kill_matrix import losses, metrics_step
from tests.test_multiprocess import ROOT, SMOKE, STEERING

STOP_WITHIN_S = 90  # SIGTERM -> both processes exited (a few steps and one save on 2 busy cores)
SIGNAL_AT_STEP = 30  # finetune: 126 steps, checkpoints every 20: 30 is between two of them


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(wd: str, logs: str) -> list[subprocess.Popen]:
  """Two processes of `python -m first_jax.finetune` on the smoke config, joined into one job."""
  port, procs = _port(), []
  base = {k: v for k, v in os.environ.items() if k not in STEERING}
  for i in range(2):
    env = {**base, "FIRST_JAX_COORDINATOR": f"localhost:{port}",
           "FIRST_JAX_NUM_PROCESSES": "2", "FIRST_JAX_PROCESS_ID": str(i),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "FIRST_JAX_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(os.path.join(logs, f"{os.path.basename(wd)}-p{i}-{time.time_ns()}.log"), "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "first_jax.finetune", "--config", SMOKE,
         f"--config.workdir={wd}"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
  return procs


def wait_all(procs, timeout: float) -> list[int]:
  end = time.time() + timeout
  rcs = []
  for p in procs:
    try:
      rcs.append(p.wait(timeout=max(1.0, end - time.time())))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"a process did not exit within {timeout:.0f} s (a host waiting for another)")
  return rcs


def checkpoint_steps(wd: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(wd, "teacher", "checkpoints"))
                if d.isdigit())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  root = tmp_path_factory.mktemp("preempt2")
  wd = str(root / "unbroken")
  assert wait_all(start(wd, str(root)), 1800) == [0, 0], "the unbroken 2-process run failed"
  return wd


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [(1,), (0, 1)], ids=["one-host", "both-hosts"])
def test_sigterm_stops_every_host_at_one_step_and_resumes_exactly(unbroken, signalled, tmp_path):
  wd = str(tmp_path / "run")
  procs, step_of = start(wd, str(tmp_path)), metrics_step("teacher")
  deadline = time.time() + 1800
  while step_of(wd) < SIGNAL_AT_STEP:
    assert time.time() < deadline and all(p.poll() is None for p in procs), "never reached"
    time.sleep(0.05)
  t0 = time.time()
  for i in signalled:
    procs[i].send_signal(signal.SIGTERM)
  rcs = wait_all(procs, STOP_WITHIN_S)
  stop_s = time.time() - t0
  assert rcs == [143, 143], rcs
  stopped = checkpoint_steps(wd)[-1]  # one checkpoint, saved by both at the agreed step
  assert SIGNAL_AT_STEP <= stopped < 126, stopped
  assert not os.path.exists(os.path.join(wd, "teacher", "done.json"))
  assert wait_all(start(wd, str(tmp_path)), 1800) == [0, 0]  # the same command resumes
  a, b = losses(os.path.join(unbroken, "teacher")), losses(os.path.join(wd, "teacher"))
  assert a.keys() == b.keys()
  if stopped % 10:  # metrics every 10 steps: the row whose interval the stop split holds, in
    cut = -(-stopped // 10) * 10  # the resumed run, the mean of the steps after the stop only
    assert a.pop(cut) != b.pop(cut)
  assert a == b  # every other step's loss, gradient norm, learning rate
  a = load_file(os.path.join(unbroken, "teacher", "export", "model.safetensors"))
  b = load_file(os.path.join(wd, "teacher", "export", "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  print(json.dumps({"signalled": list(signalled), "stopped_at_step": stopped,
                    "both_exited_143_after_s": round(stop_s, 1)}))
