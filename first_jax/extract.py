"""Stage 1: the fine-tuned teacher over the training split -> the top-k store.

Teacher forward and `topk.extract` run in one jitted program per batch; only the k ids,
log-probs and tail mass leave the device. One store shard per `extract.shard_size` examples;
finished shards are skipped on a re-run (resume), a different teacher, tokenizer or data is
refused by the store itself.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

from first_jax import cli, data as data_lib, finetune, log as log_lib, sharding, step, store
from first_jax import tokenizer as tokenizer_lib, trainer, workspace

log = logging.getLogger(__name__)


def topk_fn(module, k: int, answer_only: bool):
  apply = trainer.model_apply(module)
  return jax.jit(functools.partial(step.teacher_topk_step, apply=apply, k=k,
                                   answer_only=answer_only))


def run_topk(fn, params, arrays: dict, batch_size: int, batch_sharding,
             desc: str) -> dict[str, np.ndarray]:
  """Teacher top-k over all rows of `arrays` (last batch padded, then cut)."""
  n = len(arrays["input_ids"])
  batches = data_lib.BatchIterator(arrays, batch_size, seed=0, shuffle=False,
                                   drop_remainder=False, num_epochs=1)
  outs = []
  for batch in log_lib.progress(batches, desc=desc, total=-(-n // batch_size)):
    keys = [k for k in ("input_ids", "attention_mask", "answer_pos") if k in batch]
    dev = jax.device_put({k: batch[k] for k in keys}, batch_sharding)
    outs.append(jax.device_get(fn(params, dev)))
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def run(cfg) -> str:
  out = workspace.folder(cfg, "store")
  teacher_dir = workspace.folder(cfg, "teacher")
  tok = workspace.tokenizer(cfg)
  data = workspace.load_data(cfg, tok)
  train = data.splits["train"]
  teacher = workspace.load_export(cfg, teacher_dir, "teacher")
  scored_NxL = train["loss_mask"] > 0
  spec = store.StoreSpec(
      k=cfg.extract.k, vocab_size=teacher.config.vocab_size, seq_len=train["input_ids"].shape[1],
      positions=max(1, int(scored_NxL.sum(-1).max())),  # only positions with a loss are kept
      logprob_dtype=cfg.extract.logprob_dtype,
      teacher={"export": os.path.join(teacher_dir, "export"),
               "fingerprint": finetune.stage_fingerprint(cfg)},
      tokenizer_hash=tokenizer_lib.tokenizer_hash(tok), data_fingerprint=data.fingerprint)
  writer = store.StoreWriter(out, spec)
  # Response-only MCQA: only the answer position is ever trained on, so only it is extracted;
  # text: the top-k at every position, of which the store keeps the response tokens'.
  fn = topk_fn(teacher.module, cfg.extract.k, answer_only=workspace.answer_only(cfg))
  mesh = workspace.mesh(cfg)
  n, size = len(train["input_ids"]), cfg.extract.shard_size
  num_shards = -(-n // size)
  for index in range(num_shards):
    if writer.has_shard(index):
      log.info("extract: shard %d/%d done already", index + 1, num_shards)
      continue
    rows = slice(index * size, min(n, (index + 1) * size))
    part = {k: v[rows] for k, v in train.items()}
    top = run_topk(fn, teacher.params, part, cfg.extract.batch_size,
                   sharding.batch_sharding(mesh), desc=f"extract {index + 1}/{num_shards}")
    writer.write_shard(index, part["example_id"], part["input_ids"], top["teacher_ids"],
                       top["teacher_logprobs"], top["teacher_tail"], part["loss_mask"] > 0)
  writer.finalize()
  log.info("extract: %d examples in %d shards, %.1f MB", n, num_shards,
           store.store_size_bytes(out) / 1e6)
  return out


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
