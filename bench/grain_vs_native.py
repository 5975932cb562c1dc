"""Batches/s of the Grain loader (bench/grain_batches.py, GrainBatches) vs data.BatchIterator.

    python -m bench.grain_vs_native [--n 20000] [--batch 32] [--length 256] [--repeats 3]
                                    [--store]   # also: batches with the top-k store's targets

Synthetic encoded arrays (input_ids / attention_mask / targets int32, loss_mask float32,
example_id int64; row lengths uniform in [8, L]). Each case runs one epoch `--repeats` times;
the best wall time is reported as batches/s, with the CPU time per batch (all threads; on a
loaded machine it is the steadier figure). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench import grain_batches as grain_data  # noqa: E402
from first_jax import data  # noqa: E402


def synthetic(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, length + 1, size=n)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1, 32000, size=(n, length)), 0).astype(np.int32)
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  return {"input_ids": ids, "attention_mask": mask, "targets": targets,
          "loss_mask": mask.astype(np.float32), "example_id": np.arange(n, dtype=np.int64)}


def build_store(folder: str, arrays: dict, positions: int = 32, k: int = 5) -> None:
  from first_jax.store import StoreSpec, StoreWriter
  n, length = arrays["input_ids"].shape
  spec = StoreSpec(k=k, vocab_size=32000, seq_len=length, positions=positions,
                   teacher={"path": "bench"}, tokenizer_hash="bench", data_fingerprint="bench")
  rng = np.random.default_rng(1)
  writer = StoreWriter(folder, spec)
  for s, a in enumerate(range(0, n, 4096)):
    sl = slice(a, a + 4096)
    m = len(arrays["example_id"][sl])
    mask = np.zeros((m, length), bool)
    mask[:, :positions] = arrays["attention_mask"][sl][:, :positions] > 0
    writer.write_shard(s, arrays["example_id"][sl], arrays["input_ids"][sl],
                       rng.integers(0, 32000, (m, length, k)),
                       -rng.exponential(2.0, (m, length, k)).astype(np.float32),
                       -rng.exponential(4.0, (m, length)).astype(np.float32), mask)
  writer.finalize()


def measure(make, batches: int, repeats: int) -> dict[str, float]:
  best_wall, best_cpu = float("inf"), float("inf")
  for _ in range(repeats):
    it = make()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    best_wall = min(best_wall, time.perf_counter() - w0)
    best_cpu = min(best_cpu, time.process_time() - c0)
    if hasattr(it, "close"):
      it.close()
  return {"batches_per_s": round(batches / best_wall, 1),
          "cpu_ms_per_batch": round(1e3 * best_cpu / batches, 3)}


def restore_latency(make, state: dict, repeats: int) -> float:
  """ms from restore(state) to the first batch in hand (a resume's data cost)."""
  best = float("inf")
  for _ in range(repeats):
    it = make()
    t0 = time.perf_counter()
    it.restore(state)
    next(it)
    best = min(best, time.perf_counter() - t0)
  return round(1e3 * best, 2)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=20000)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--store", action="store_true")
  args = p.parse_args(argv)
  arrays = synthetic(args.n, args.length)
  b, per = args.batch, args.n // args.batch
  buckets = tuple(x for x in (32, 64, 128, 256, 512, 1024) if x < args.length) + (args.length,)
  G = grain_data.GrainBatches
  cases = {
      "BatchIterator": lambda: data.BatchIterator(arrays, b, seed=0),
      "Grain native order, sync": lambda: G(arrays, b, seed=0, num_threads=0, prefetch=0),
      "Grain native order, 2 threads": lambda: G(arrays, b, seed=0, num_threads=2, prefetch=4),
      "Grain grain order (index_shuffle), sync":
          lambda: G(arrays, b, seed=0, order="grain", num_threads=0, prefetch=0),
      "BatchIterator, length buckets":
          lambda: data.BatchIterator(arrays, b, seed=0, length_buckets=buckets),
      "Grain native, length buckets, sync":
          lambda: G(arrays, b, seed=0, length_buckets=buckets, num_threads=0, prefetch=0),
      "Grain native, 1 of 4 processes, sync":
          lambda: G(arrays, b, seed=0, process_index=1, process_count=4, num_threads=0,
                    prefetch=0),
  }
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    if args.store:
      from first_jax import store, train
      build_store(tmp, arrays)
      reader_add = train.store_targets(store.StoreReader(tmp, verify=False))

      class WithTargets:  # today's path: the whole global batch's records on every process
        def __init__(self):
          self.it = data.BatchIterator(arrays, b, seed=0)

        def __next__(self):
          return reader_add(next(self.it))

      add = reader_add  # the same function, run inside the pipeline on the local rows
      cases["BatchIterator + store targets (global batch)"] = WithTargets
      cases["Grain native + store targets, sync"] = lambda: G(
          arrays, b, seed=0, map_fn=add, num_threads=0, prefetch=0)
      cases["Grain native + store targets, 2 threads"] = lambda: G(
          arrays, b, seed=0, map_fn=add, num_threads=2, prefetch=4)
      cases["Grain native + store targets, 1 of 4 processes, sync"] = lambda: G(
          arrays, b, seed=0, map_fn=add, process_index=1, process_count=4, num_threads=0,
          prefetch=0)
    for name, make in cases.items():
      results[name] = measure(make, per, args.repeats)
      print(f"{name:55s} {results[name]['batches_per_s']:9.1f} batches/s "
            f"{results[name]['cpu_ms_per_batch']:8.3f} ms CPU/batch", flush=True)
  mid = {"epoch": 3, "index": per // 2}
  results["restore_ms"] = {
      "BatchIterator": restore_latency(lambda: data.BatchIterator(arrays, b, seed=0), mid,
                                       args.repeats),
      "Grain native": restore_latency(lambda: G(arrays, b, seed=0, num_threads=0, prefetch=0),
                                      mid, args.repeats)}
  print("restore -> first batch (ms):", results["restore_ms"])
  out = {"n": args.n, "batch": b, "length": args.length, "batches_per_epoch": per,
         "results": results}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
