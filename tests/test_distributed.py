"""first_jax.runtime.distributed: env parsing, the single-process no-op, and real 2-process runs."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from first_jax.runtime import distributed
from first_jax.runtime.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables that would steer initialize(); cleared so the host's environment cannot leak in.
_STEERING = ("FIRST_JAX_DISTRIBUTED", "FIRST_JAX_COORDINATOR", "FIRST_JAX_NUM_PROCESSES",
             "FIRST_JAX_PROCESS_ID", "FIRST_JAX_INIT_TIMEOUT", "SLURM_NTASKS",
             "SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
             "JAX_LOCAL_DEVICE_IDS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "JAX_COORDINATOR_PORT")

EXPLICIT = {"FIRST_JAX_COORDINATOR": "10.0.0.1:1234", "FIRST_JAX_NUM_PROCESSES": "4",
            "FIRST_JAX_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_STEP_NUM_NODES": "2"}


def test_plan_single_process_cases():
  assert distributed.plan_from_env({}) is None
  assert distributed.plan_from_env({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}) is None
  assert distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}) is None
  one = {"FIRST_JAX_COORDINATOR": "127.0.0.1:5", "FIRST_JAX_NUM_PROCESSES": "1",
         "FIRST_JAX_PROCESS_ID": "0"}
  assert distributed.plan_from_env(one) is None
  assert distributed.plan_from_env({**one, "FIRST_JAX_DISTRIBUTED": "on"}).source == "explicit"
  assert distributed.plan_from_env({**EXPLICIT, **SLURM, "FIRST_JAX_DISTRIBUTED": "off"}) is None


def test_plan_explicit_beats_cluster_detection():
  plan = distributed.plan_from_env({**EXPLICIT, **SLURM, "FIRST_JAX_INIT_TIMEOUT": "42"})
  assert plan.source == "explicit"
  assert plan.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                             cluster_detection_method="deactivate", initialization_timeout=42)


@pytest.mark.parametrize("env, var", [
    ({**EXPLICIT, "FIRST_JAX_PROCESS_ID": "4"}, "FIRST_JAX_PROCESS_ID"),
    ({**EXPLICIT, "FIRST_JAX_PROCESS_ID": "-1"}, "FIRST_JAX_PROCESS_ID"),
    ({**EXPLICIT, "FIRST_JAX_NUM_PROCESSES": "two"}, "FIRST_JAX_NUM_PROCESSES"),
    ({**EXPLICIT, "FIRST_JAX_NUM_PROCESSES": "0"}, "FIRST_JAX_NUM_PROCESSES"),
    ({**EXPLICIT, "FIRST_JAX_COORDINATOR": "10.0.0.1"}, "FIRST_JAX_COORDINATOR"),
    ({**EXPLICIT, "FIRST_JAX_COORDINATOR": "host:99999"}, "FIRST_JAX_COORDINATOR"),
    ({"FIRST_JAX_NUM_PROCESSES": "2", "FIRST_JAX_PROCESS_ID": "0"}, "FIRST_JAX_COORDINATOR"),
    ({"FIRST_JAX_COORDINATOR": "h:1", "FIRST_JAX_NUM_PROCESSES": "2"}, "FIRST_JAX_PROCESS_ID"),
    ({"FIRST_JAX_DISTRIBUTED": "maybe"}, "FIRST_JAX_DISTRIBUTED"),
    ({**EXPLICIT, "FIRST_JAX_INIT_TIMEOUT": "1.5"}, "FIRST_JAX_INIT_TIMEOUT"),
    ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, "srun"),  # batch step, not an srun task
])
def test_plan_bad_env_names_the_variable(env, var):
  with pytest.raises(UserError, match=var) as e:
    distributed.plan_from_env(env)
  assert "\n" not in str(e.value)


def test_plan_slurm_one_task_per_node_sees_all_gpus():
  plan = distributed.plan_from_env({**SLURM, "CUDA_VISIBLE_DEVICES": "2,5,7"})
  assert plan.source == "slurm" and plan.note == ""
  assert plan.kwargs["cluster_detection_method"] == "slurm"
  assert plan.kwargs["local_device_ids"] == [0, 1, 2]
  # The user's JAX_LOCAL_DEVICE_IDS wins (jax reads it itself); several tasks per node: jax's
  # one-GPU-per-task default.
  assert "local_device_ids" not in distributed.plan_from_env(
      {**SLURM, "CUDA_VISIBLE_DEVICES": "0,1", "JAX_LOCAL_DEVICE_IDS": "0"}).kwargs
  assert "local_device_ids" not in distributed.plan_from_env(
      {**SLURM, "SLURM_STEP_NUM_NODES": "1", "CUDA_VISIBLE_DEVICES": "0,1"}).kwargs
  assert "JAX_LOCAL_DEVICE_IDS" in distributed.plan_from_env(SLURM).note


def test_plan_tpu_pod_and_forced():
  plan = distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"})
  assert plan.source == "tpu" and plan.kwargs == {"initialization_timeout": 300}
  assert distributed.plan_from_env({"FIRST_JAX_DISTRIBUTED": "ON"}).source == "forced"


def test_initialize_single_process_is_a_noop(monkeypatch):
  for name in _STEERING:
    monkeypatch.delenv(name, raising=False)
  distributed.initialize()
  distributed.initialize()
  assert not jax.distributed.is_initialized()
  assert distributed.process_info() == (0, 1)
  assert distributed.is_main()
  distributed.sync("single")  # must not block
  assert distributed.log_topology() == {0: {"cpu": jax.device_count()}}


def test_initialize_bad_env_raises_before_touching_jax(monkeypatch):
  for name in _STEERING:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("FIRST_JAX_COORDINATOR", "127.0.0.1:1")
  monkeypatch.setenv("FIRST_JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("FIRST_JAX_PROCESS_ID", "2")
  with pytest.raises(UserError, match="FIRST_JAX_PROCESS_ID"):
    distributed.initialize()
  assert not jax.distributed.is_initialized()


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from first_jax.runtime import distributed
    distributed.initialize()
    distributed.initialize()  # a second call must be a no-op
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    pid, count = distributed.process_info()
    table = distributed.log_topology()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    local_BxD = np.random.default_rng(int(sys.argv[1]) + pid).normal(size=(6, 5))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                               local_BxD.astype(np.float32))
    total = float(jax.jit(jnp.sum)(x))
    distributed.sync("done")
    print("RESULT " + json.dumps(dict(pid=pid, count=count, devices=jax.device_count(),
        local=len(jax.local_devices()), shape=list(x.shape), total=total,
        main=distributed.is_main(), table={str(k): v for k, v in table.items()})), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launcher_env(launcher: str, port: int, i: int) -> dict[str, str]:
  if launcher == "explicit":
    return {"FIRST_JAX_COORDINATOR": f"127.0.0.1:{port}", "FIRST_JAX_NUM_PROCESSES": "2",
            "FIRST_JAX_PROCESS_ID": str(i)}
  # What srun sets for 2 tasks on one node; jax's own Slurm detection takes it from here.
  return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
          "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1",
          "JAX_COORDINATOR_PORT": str(port)}


def run_two(tmp_path, worker: str, seed: int, launcher: str = "explicit",
            timeout_s: float = 120) -> list[dict]:
  """Runs `worker` as 2 processes of 2 CPU devices each joining one mesh; their RESULT JSON."""
  script = tmp_path / "worker.py"
  script.write_text(worker)
  port = _free_port()
  base = {k: v for k, v in os.environ.items() if k not in _STEERING and not k.startswith("SLURM_")}
  base.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
              FIRST_JAX_INIT_TIMEOUT="60", FIRST_JAX_NO_PROGRESS="1",
              PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
  procs = []
  try:
    for i, (out, err) in enumerate(logs):  # files, not pipes: a full pipe cannot stall a worker
      with open(out, "w") as fo, open(err, "w") as fe:
        procs.append(subprocess.Popen([sys.executable, str(script), str(seed)],
                                      env={**base, **_launcher_env(launcher, port, i)},
                                      cwd=tmp_path, stdout=fo, stderr=fe))
    deadline = time.monotonic() + timeout_s
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = [(out.read_text(), err.read_text()) for out, err in logs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, (out + err)[-3000:]
  # stdout only: gloo's connection messages go to stderr.
  return [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
          for out, _ in outs]


@pytest.mark.parametrize("launcher", ["explicit", "slurm"])
def test_two_processes_form_one_mesh(tmp_path, launcher):
  seed = int(np.random.default_rng().integers(1 << 30))
  results = run_two(tmp_path, WORKER, seed, launcher)
  expected = sum(np.random.default_rng(seed + i).normal(size=(6, 5)).astype(np.float32)
                 .astype(np.float64).sum() for i in range(2))
  for i, r in enumerate(results):
    assert (r["pid"], r["count"], r["devices"], r["local"]) == (i, 2, 4, 2)
    assert r["shape"] == [12, 5] and r["main"] == (i == 0)
    assert r["table"] == {"0": {"cpu": 2}, "1": {"cpu": 2}}
    np.testing.assert_allclose(r["total"], expected, rtol=1e-5, atol=1e-4)


ROWS_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from first_jax.data import batches as data
    from first_jax.runtime import distributed, sharding
    distributed.initialize()
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    out = {}
    rng = np.random.default_rng(int(sys.argv[1]))  # the same data on every process
    n, B, L = 40, 8, 12
    lengths = rng.integers(2, L + 1, size=n)
    arrays = {"input_ids": rng.integers(1, 50, size=(n, L)).astype(np.int32),
              "attention_mask": (np.arange(L)[None] < lengths[:, None]).astype(np.int32),
              "example_id": np.arange(n)}
    for axes in (("data", "tensor"), ("tensor", "data")):  # tensor across / within processes
      mesh = jax.make_mesh((2, 2), axes, axis_types=(AxisType.Auto,) * 2)
      bs = NamedSharding(mesh, P("data"))
      rows = sharding.process_rows(bs, B)
      it = data.BatchIterator(arrays, B, seed=3, length_buckets=(4, 8, 12), trim=True,
                              host_rows=rows)
      got = []
      for _ in range(3):
        b = next(it)
        x = sharding.put_process_rows({k: b[k] for k in ("input_ids", "valid")}, bs, B)
        weights = jnp.arange(1, B + 1, dtype=jnp.float32)[:, None]
        got.append([int(b["example_id"][0]), list(x["input_ids"].shape),
                    float(jax.jit(lambda a: (a * weights).sum())(x["input_ids"]))])
      out["-".join(axes)] = dict(rows=[rows.start, rows.stop], batches=got)
    distributed.sync("done")
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_two_processes_each_feed_only_their_rows_of_the_global_batch(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  results = run_two(tmp_path, ROWS_WORKER, seed, timeout_s=180)
  # the global batches one process computes from all the rows
  from first_jax.data import batches as data
  rng = np.random.default_rng(seed)
  n, B, L = 40, 8, 12
  lengths = rng.integers(2, L + 1, size=n)
  arrays = {"input_ids": rng.integers(1, 50, size=(n, L)).astype(np.int32),
            "attention_mask": (np.arange(L)[None] < lengths[:, None]).astype(np.int32),
            "example_id": np.arange(n)}
  it = data.BatchIterator(arrays, B, seed=3, length_buckets=(4, 8, 12), trim=True)
  want = []
  for _ in range(3):
    b = next(it)
    want.append((b["input_ids"].shape, float((b["input_ids"] * np.arange(1, B + 1)[:, None]).sum()),
                 b["example_id"]))
  # the batch split over processes: 4 rows each; replicated over a tensor axis that spans them:
  # every process feeds (and reads) all 8
  assert [r["data-tensor"]["rows"] for r in results] == [[0, 4], [4, 8]]
  assert [r["tensor-data"]["rows"] for r in results] == [[0, 8], [0, 8]]
  for r in results:
    for layout in ("data-tensor", "tensor-data"):
      start = r[layout]["rows"][0]
      for (first_id, shape, total), (w_shape, w_total, w_ids) in zip(r[layout]["batches"], want):
        assert tuple(shape) == w_shape and first_id == int(w_ids[start]), layout
        assert total == w_total, (layout, total, w_total)
