"""A served teacher against the same weights in process (issue 27), on a real server.

    pip install -e '.[serve]'        # llama-cpp-python[server] 0.3.36, compiled from its sdist
    python -m bench.served_teacher --out docs/benchmarks/served_teacher.json \
        [--rows 32] [--record tests/fixtures/served]

Starts llama-cpp-python's server (`python -m llama_cpp.server`, logits_all) on 127.0.0.1 with
the SmolLM2-135M-Instruct GGUF the project's asset cache holds (Q4_1), and reads, at EVERY
position of `--rows` validation rows of the main job (configs/served.py = configs/demo.py's
data), the top-5 the server returns and the top-5 of the same GGUF dequantized into our float32
JAX model (the in-process extraction program). Records: top-1 id agreement, top-5 id overlap,
|delta log-prob| (max, median, 99th percentile) over ids both kept, positions per second both
ways, entries dropped as ambiguous texts. The server computes with the quantised weights (and
8-bit quantised activations in its dot products) where we dequantize once, so the log-probs
differ by that quantisation error; the ids mostly agree. Then the resume check: the extract
stage into a store twice, once unbroken and once with the server SIGKILLed after the first
shard (the stage must exit 2 with one line) and started again (the re-run must ask only for the
rest), and the two stores' shards compared byte for byte. `--record DIR` also writes the
server's answers (models, tokenize, one completion) as the loopback tests' fixtures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "served.py")
ALIAS = "smollm2"
K = 5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(gguf: str, port: int, threads: int) -> subprocess.Popen:
  """llama-cpp-python's server on 127.0.0.1:port, once its /v1/models answers."""
  cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", ALIAS,
         "--logits_all", "true", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
         "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "false"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 180
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f"llama_cpp.server exited {proc.returncode}: "
                       f"{proc.stderr.read().decode()[-2000:]}")
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
      return proc
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise SystemExit("llama_cpp.server did not answer within 180 s")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
  if proc.poll() is None:
    proc.send_signal(sig)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def post(url: str, path: str, body: dict) -> dict:
  req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=120) as r:
    return json.loads(r.read())


def record(url: str, tok, out_dir: str) -> None:
  """The real server's answers, as the loopback tests' fixtures."""
  from first_jax.engine import served
  os.makedirs(out_dir, exist_ok=True)
  with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
    models = json.loads(r.read())
  tokenize = post(url, "/extras/tokenize", {"model": ALIAS, "input": served.PROBE_TEXT})
  body = {"model": ALIAS, "prompt": "Is this tweet negative, neutral or positive? Answer:",
          "max_tokens": 1, "echo": True, "logprobs": 3, "temperature": 0.0, "seed": 0}
  completion = post(url, "/v1/completions", body)
  for name, obj in (("models", models), ("tokenize", {"request": served.PROBE_TEXT,
                                                      "response": tokenize,
                                                      "ours": tok(served.PROBE_TEXT,
                                                                  add_special_tokens=False)[
                                                          "input_ids"]}),
                    ("completion", {"request": body, "response": completion})):
    with open(os.path.join(out_dir, f"llama_cpp_{name}.json"), "w") as f:
      json.dump(obj, f, indent=1, ensure_ascii=False)
      f.write("\n")


def agreement(url: str, rows: int) -> dict:
  """Top-5 at every position of `rows` validation rows: served vs in process."""
  from first_jax import config as config_lib
  from first_jax.engine import infer, served
  from first_jax.engine.job import Job

  wd = tempfile.mkdtemp(prefix="served_bench_")
  cfg = config_lib.load(["--config", f"{CONFIG}:url={url}", f"--config.workdir={wd}",
                         "--config.teacher.model.dtype=float32"])
  job = Job(cfg)
  val = {k: v[:rows] for k, v in job.data.splits["validation"].items()}
  lengths = val["attention_mask"].sum(-1)
  every = np.zeros_like(val["loss_mask"])
  for r, n in enumerate(lengths):
    every[r, 1:n] = 1  # every position with a next token in the row, but the first (no answer)
  arrays = {**val, "loss_mask": every}
  at = every > 0
  positions = int(at.sum())

  client = served.Client(served.Server.of(cfg.teacher.server), job.tokenizer)
  client.check(K)
  t0 = time.perf_counter()
  top_s = client.topk_rows(arrays, K, answer_only=False, desc="served")
  served_s = time.perf_counter() - t0

  teacher = job.init_model("teacher").for_inference()
  fn = infer.topk_program(teacher.module, teacher.params, K, False, job.mesh)
  infer.topk_rows(fn, teacher.params, {k: v[:cfg.extract.batch_size] for k, v in val.items()},
                  cfg.extract.batch_size, job.mesh, desc="compile")
  t0 = time.perf_counter()
  top_l = infer.topk_rows(fn, teacher.params, val, cfg.extract.batch_size, job.mesh,
                          desc="in process")
  local_s = time.perf_counter() - t0

  ids_s, ids_l = top_s["teacher_ids"][at], top_l["teacher_ids"][at]
  lp_s, lp_l = top_s["teacher_logprobs"][at], top_l["teacher_logprobs"][at]
  kept_s = lp_s > -1e3  # slots the server filled (an ambiguous text leaves one empty)
  overlap = np.array([len(set(a[m]) & set(b)) / K for a, m, b in zip(ids_s, kept_s, ids_l)])
  # the same over the ids the llama_cpp schema can name (an ambiguous one is dropped by design)
  mappable = np.isin(ids_l, np.asarray(sorted(client.index.values())))
  overlap_m = np.array([len(set(a[m]) & set(b[bm])) / max(1, bm.sum())
                        for a, m, b, bm in zip(ids_s, kept_s, ids_l, mappable)])
  first_m = mappable[:, 0]
  answer = np.zeros_like(at)
  answer[np.arange(len(val["answer_pos"])), val["answer_pos"]] = True
  at_answer = answer[at]
  deltas = []
  for a, m, la, b, lb in zip(ids_s, kept_s, lp_s, ids_l, lp_l):
    where = {int(i): float(v) for i, v in zip(b, lb)}
    deltas += [abs(float(v) - where[int(i)]) for i, v in zip(a[m], la[m]) if int(i) in where]
  deltas = np.asarray(deltas)
  top1 = ids_s[:, 0] == ids_l[:, 0]
  return {
      "rows": rows, "positions": positions, "k": K,
      "top1_id_agreement": float(top1.mean()),
      "topk_id_overlap_mean": float(overlap.mean()),
      "top1_id_agreement_where_mappable": float(top1[first_m].mean()),
      "positions_top1_ambiguous": int((~first_m).sum()),
      "topk_id_overlap_mean_of_mappable": float(overlap_m.mean()),
      "answer_positions": {"n": int(at_answer.sum()),
                           "top1_id_agreement": float(top1[at_answer].mean()),
                           "topk_id_overlap_mean": float(overlap[at_answer].mean()),
                           "ambiguous_ids_in_topk": int((~mappable[at_answer]).sum())},
      "abs_delta_logprob": {"max": float(deltas.max()), "median": float(np.median(deltas)),
                            "p99": float(np.percentile(deltas, 99)), "n": int(len(deltas))},
      "tail_abs_delta_median": float(np.median(np.abs(top_s["teacher_tail"][at]
                                                      - top_l["teacher_tail"][at]))),
      "ambiguous_entries_dropped": int(client.counts["ambiguous"]),
      "entries": int(positions * K),
      "served": {"seconds": round(served_s, 2), "positions_per_s": round(positions / served_s, 1),
                 "requests": client.counts["requests"],
                 "bytes_received": client.counts["bytes_received"],
                 "concurrency": cfg.teacher.server.concurrency},
      "in_process": {"seconds": round(local_s, 2), "positions_per_s": round(positions / local_s,
                                                                            1),
                     "dtype": "float32", "note": "positions computed: every row, every position "
                                                 "(forward + top-k over the batch)"},
  }


def _extract(url: str, wd: str, extra: list[str]) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "first_jax.extract", "--config", f"{CONFIG}:url={url}",
         f"--config.workdir={wd}", "--config.data.num_examples=60",
         "--config.extract.shard_size=10", "--config.teacher.server.retries=1",
         "--config.teacher.server.backoff_s=0.2"] + extra
  env = {**os.environ, "FIRST_JAX_NO_PROGRESS": "1"}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _shards(wd: str) -> list[str]:
  m = json.load(open(os.path.join(wd, "store", "manifest.json")))
  return [s["sha256"] for s in m["shards"]]


def resume(gguf: str, threads: int) -> dict:
  """An unbroken served extraction, and one whose server is SIGKILLed after its first shard
  and started again: the same store?"""
  root = tempfile.mkdtemp(prefix="served_resume_")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = start_server(gguf, port, threads)
  try:
    t0 = time.time()
    a = _extract(url, os.path.join(root, "unbroken"), [])
    _, err = a.communicate()
    assert a.returncode == 0, err[-2000:]
    unbroken_s = time.time() - t0
    b_wd = os.path.join(root, "broken")
    b = _extract(url, b_wd, [])
    manifest = os.path.join(b_wd, "store", "manifest.json")
    while b.poll() is None:  # kill the server once the first shard is written
      if os.path.exists(manifest) and json.load(open(manifest)).get("shards"):
        break
      time.sleep(0.2)
    stop(server, signal.SIGKILL)
    _, err = b.communicate()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    done_before = len(json.load(open(manifest))["shards"])
  finally:
    stop(server, signal.SIGKILL)
  server = start_server(gguf, port, threads)
  try:
    c = _extract(url, b_wd, [])
    _, err2 = c.communicate()
  finally:
    stop(server)
  m = json.load(open(manifest))
  same = _shards(os.path.join(root, "unbroken")) == _shards(b_wd)
  return {"shards": len(m["shards"]), "shards_done_when_killed": done_before,
          "killed_run_exit_code": b.returncode, "killed_run_error_lines": errors,
          "resumed_exit_code": c.returncode, "resumed_requests": m.get("served", {}).get(
              "requests"), "rows_per_shard": 10,
          "store_identical_to_unbroken": bool(same), "unbroken_seconds": round(unbroken_s, 1)}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--rows", type=int, default=32)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--record", default="")
  ap.add_argument("--skip-resume", action="store_true")
  args = ap.parse_args(argv)
  import llama_cpp  # the [serve] extra

  from first_jax.data import assets
  from first_jax.engine.job import load_tokenizer
  gguf = str(assets.fetch("smollm2"))
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = start_server(gguf, port, args.threads)
  try:
    if args.record:
      record(url, load_tokenizer("smollm2"), args.record)
    common.log("agreement ...")
    result = {"server": {"name": "llama-cpp-python server", "version": llama_cpp.__version__,
                         "weights": os.path.basename(gguf), "threads": args.threads},
              "agreement": agreement(url, args.rows)}
  finally:
    stop(server)
  if not args.skip_resume:
    common.log("resume ...")
    result["resume"] = resume(gguf, args.threads)
  result["environment"] = common.environment()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
  main()
