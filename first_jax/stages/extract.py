"""Stage 1: the fine-tuned teacher over the training split -> the top-k store.

Teacher forward and `topk.extract` run in one jitted program per batch; only the k ids,
log-probs and tail mass leave the device. One store shard per `extract.shard_size` examples;
finished shards are skipped on a re-run (resume), a different teacher, tokenizer or data is
refused by the store itself.
"""
from __future__ import annotations

import logging
import os

import jax

from first_jax.runtime import distributed
from first_jax.data import store, tokenizer as tokenizer_lib
from first_jax.engine import infer
from first_jax.engine.job import Job
from first_jax.stages import base

log = logging.getLogger(__name__)


def is_done(job: Job) -> bool:
  """The store is complete and of this config's teacher, data, k and log-prob dtype (what
  extraction would otherwise verify, or refuse)."""
  m, c = store.read_manifest(job.layout.store), job.cfg.extract
  return bool(m is not None and m.get("complete")
              and (m.get("teacher") or {}).get("fingerprint") == job.teacher_fingerprint
              and m.get("data_fingerprint") == job.data_fingerprint and m.get("k") == c.k
              and m.get("logprob_dtype") == c.logprob_dtype)


def run(job: Job) -> str:
  out, teacher_dir, c = job.layout.store, job.layout.teacher, job.cfg.extract
  train = job.data.splits["train"]
  teacher = job.load_export(teacher_dir, "teacher")
  scored_NxL = train["loss_mask"] > 0
  spec = store.StoreSpec(
      k=c.k, vocab_size=teacher.config.vocab_size, seq_len=train["input_ids"].shape[1],
      positions=max(1, int(scored_NxL.sum(-1).max())),  # only positions with a loss are kept
      logprob_dtype=c.logprob_dtype,
      teacher={"export": os.path.join(teacher_dir, "export"),
               "fingerprint": job.teacher_fingerprint},
      tokenizer_hash=tokenizer_lib.tokenizer_hash(job.tokenizer),
      data_fingerprint=job.data.fingerprint)
  # Every process writes the rows it computed into its own shard files; process 0 merges the
  # manifests (finalize) once all are complete.
  writer = store.StoreWriter(out, spec, host_id=jax.process_index(),
                             num_hosts=jax.process_count())
  mesh = job.mesh
  # Response-only MCQA: only the answer position is ever trained on, so only it is extracted;
  # text: the top-k at every position, of which the store keeps the response tokens'.
  teacher = teacher.for_inference()
  fn = infer.topk_program(teacher.module, teacher.params, c.k, job.answer_only, mesh)
  n, size = len(train["input_ids"]), c.shard_size
  num_shards = -(-n // size)
  for index in range(num_shards):
    if distributed.all_processes(writer.has_shard(index)):  # every process runs every batch
      log.info("extract: shard %d/%d done already", index + 1, num_shards)
      continue
    rows = slice(index * size, min(n, (index + 1) * size))
    part = {k: v[rows] for k, v in train.items()}
    top = infer.topk_rows(fn, teacher.params, part, c.batch_size, mesh,
                          desc=f"extract {index + 1}/{num_shards}", gather=False)
    mine = top["row"]
    writer.write_shard(index, part["example_id"][mine], part["input_ids"][mine],
                       top["teacher_ids"], top["teacher_logprobs"], top["teacher_tail"],
                       part["loss_mask"][mine] > 0)
  writer.finalize()  # process 0 merges every process's manifest part
  if distributed.is_main():  # for reports: bytes per stored (scored) token
    store.update_manifest(out, scored_tokens=int(scored_NxL.sum()))
  distributed.sync("extract: store complete")
  log.info("extract: %d examples in %d shards, %.1f MB", n, num_shards,
           store.store_size_bytes(out) / 1e6)
  return out


STAGE = base.Stage(
    name="extract", run=run, is_done=is_done, where=lambda job: job.layout.store,
    outputs=lambda job: [job.layout.store], when_done=lambda job: job.layout.store)
