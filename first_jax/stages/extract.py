"""Stage 1: the fine-tuned teacher over the training split -> the top-k store.

Teacher forward and `topk.extract` run in one jitted program per batch; only the k ids,
log-probs and tail mass leave the device. One store shard per `extract.shard_size` examples;
finished shards are skipped on a re-run (resume), a different teacher, tokenizer or data is
refused by the store itself. A served teacher (`teacher.source=server`) fills the same store
from its server's top-k log-probs (`first_jax.engine.served`, docs/served_teacher.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import numpy as np

from first_jax.runtime import distributed
from first_jax.data import store, tokenizer as tokenizer_lib
from first_jax.engine import infer
from first_jax.engine.job import Job
from first_jax.stages import base

log = logging.getLogger(__name__)


def store_is_done(job: Job, path: str, k: int, sampling: dict) -> bool:
  """The store at `path` is complete and of this config's teacher, data, k, log-prob dtype and
  (a sampled store) sampling (what extraction would otherwise verify, or refuse)."""
  m, c = store.read_manifest(path), job.cfg.extract
  return bool(m is not None and m.get("complete")
              and (m.get("teacher") or {}).get("fingerprint") == job.teacher_fingerprint
              and m.get("data_fingerprint") == job.data_fingerprint and m.get("k") == k
              and m.get("logprob_dtype") == c.logprob_dtype
              and (m.get("sampling") or {}) == sampling)


def is_done(job: Job) -> bool:
  return store_is_done(job, job.layout.store, job.cfg.extract.k, {})


@dataclasses.dataclass(frozen=True)
class Targets:
  """Where a store's targets come from: `rows(part, desc)` -> this process's rows of `part`
  (`infer.topk_rows`' layout, their indices in "row"); `teacher`: the store's teacher block;
  `vocab_size`: an upper bound of the ids (the store packs them in its bits)."""
  rows: Callable[[dict, str], dict]
  teacher: dict
  vocab_size: int
  counts: Callable[[], dict] | None = None  # a served teacher's request counts


def local_targets(job: Job, program: Callable, by_example: bool) -> Targets:
  """The fine-tuned teacher in process: `program(module, params, mesh)` is the jitted per-batch
  program (forward + top-k, or forward + sample)."""
  teacher_dir = job.layout.teacher
  teacher = job.load_export(teacher_dir, "teacher")
  vocab_size = teacher.config.vocab_size
  teacher = teacher.for_inference()
  fn, mesh, c = program(teacher.module, teacher.params, job.mesh), job.mesh, job.cfg.extract
  rows = lambda part, desc: infer.topk_rows(fn, teacher.params, part, c.batch_size, mesh,
                                            desc=desc, gather=False, by_example=by_example)
  return Targets(rows, {"export": os.path.join(teacher_dir, "export"),
                        "fingerprint": job.teacher_fingerprint}, vocab_size)


def served_targets(job: Job, k: int) -> Targets:
  """The teacher behind `teacher.server` (first_jax.engine.served): its top-k at T = 1."""
  client, s = job.served_teacher(), job.cfg.teacher.server
  rows = lambda part, desc: client.topk_rows(part, k, job.answer_only, desc, gather=False)
  # the url is no part of the teacher (a resumed run may reach it elsewhere): `served` keeps it
  return Targets(rows, {"server": {"api": s.api, "model": s.model},
                        "fingerprint": job.teacher_fingerprint}, served_vocab_size(job),
                 counts=lambda: {"url": s.url, **client.counts})


def served_vocab_size(job: Job) -> int:
  """A bound of the served ids: the tokenizer's and the configured models' vocabularies."""
  cfg = job.cfg
  return max(tokenizer_lib.vocab_size(job.tokenizer), cfg.teacher.model.vocab_size,
             cfg.student.model.vocab_size)


def write_store(job: Job, out: str, k: int, targets: Targets, sampling: dict, desc: str) -> str:
  """The teacher's targets (`targets`) over the training split into the store `out`, `k` slots
  per position; `sampling`: the store spec's (empty for top-k). Finished shards are kept
  (resume); every process writes its own rows."""
  c = job.cfg.extract
  train = dict(job.data.splits["train"])
  train["example_id"] = train["example_id"].astype(np.int32)  # the sampled draws' key
  scored_NxL = train["loss_mask"] > 0
  spec = store.StoreSpec(
      k=k, vocab_size=targets.vocab_size, seq_len=train["input_ids"].shape[1],
      positions=max(1, int(scored_NxL.sum(-1).max())),  # only positions with a loss are kept
      logprob_dtype=c.logprob_dtype, teacher=targets.teacher,
      tokenizer_hash=tokenizer_lib.tokenizer_hash(job.tokenizer),
      data_fingerprint=job.data.fingerprint, sampling=sampling)
  # Every process writes the rows it computed into its own shard files; process 0 merges the
  # manifests (finalize) once all are complete.
  writer = store.StoreWriter(out, spec, host_id=jax.process_index(),
                             num_hosts=jax.process_count())
  n, size = len(train["input_ids"]), c.shard_size
  num_shards = -(-n // size)
  for index in range(num_shards):
    if distributed.all_processes(writer.has_shard(index)):  # every process runs every batch
      log.info("%s: shard %d/%d done already", desc, index + 1, num_shards)
      continue
    rows = slice(index * size, min(n, (index + 1) * size))
    part = {k: v[rows] for k, v in train.items()}
    top = targets.rows(part, f"{desc} {index + 1}/{num_shards}")
    mine = top["row"]
    writer.write_shard(index, part["example_id"][mine], part["input_ids"][mine],
                       top["teacher_ids"], top["teacher_logprobs"], top["teacher_tail"],
                       part["loss_mask"][mine] > 0)
  writer.finalize()  # process 0 merges every process's manifest part
  if distributed.is_main():  # for reports: bytes per stored (scored) token
    extra = {}
    if targets.counts is not None:  # this run's requests added to an interrupted run's
      before = (store.read_manifest(out) or {}).get("served") or {}
      extra["served"] = {key: v if isinstance(v, str) else before.get(key, 0) + v
                         for key, v in targets.counts().items()}
    store.update_manifest(out, scored_tokens=int(scored_NxL.sum()), **extra)
  distributed.sync(f"{desc}: store complete")
  log.info("%s: %d examples in %d shards, %.1f MB", desc, n, num_shards,
           store.store_size_bytes(out) / 1e6)
  return out


def run(job: Job) -> str:
  # Response-only MCQA: only the answer position is ever trained on, so only it is extracted;
  # text: the top-k at every position, of which the store keeps the response tokens'.
  k = job.cfg.extract.k
  if job.cfg.teacher.source == "server":  # checked before anything is written
    return write_store(job, job.layout.store, k, served_targets(job, k), {}, "extract")
  program = lambda module, params, mesh: infer.topk_program(module, params, k, job.answer_only,
                                                            mesh)
  job.data  # the data (and its errors) before the teacher loads
  return write_store(job, job.layout.store, k, local_targets(job, program, False), {},
                     "extract")


STAGE = base.Stage(
    name="extract", run=run, is_done=is_done, where=lambda job: job.layout.store,
    outputs=lambda job: [job.layout.store], when_done=lambda job: job.layout.store)
