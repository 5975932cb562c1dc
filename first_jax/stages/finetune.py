"""Stage 0: supervised fine-tuning of the teacher (cross-entropy, optional label smoothing).

Writes workdir/teacher/{checkpoints, metrics.jsonl, export/}; the export (HF format) is the
fine-tuned teacher every later stage loads.
"""
from __future__ import annotations

import logging
import os

from first_jax.runtime import sharding
from first_jax.core import step
from first_jax.engine import trainer, workspace
from first_jax.stages import base

log = logging.getLogger(__name__)


def is_done(cfg) -> bool:
  return workspace.is_done(workspace.folder(cfg, "teacher"), workspace.teacher_fingerprint(cfg))


def run(cfg) -> str:
  out = workspace.folder(cfg, "teacher")
  fp = workspace.teacher_fingerprint(cfg)
  tok = workspace.tokenizer(cfg)
  data = workspace.load_data(cfg, tok)
  model = workspace.init_model(cfg, "teacher", tok)
  workspace.start_run(out, fp)
  mesh = workspace.mesh(cfg)
  spec = step.LossSpec(kind="ce", label_smoothing=cfg.finetune.label_smoothing,
                       answer_only=workspace.answer_only(cfg))
  params = trainer.train_model(
      name="finetune", folder=out, module=model.module, params=model.params,
      arrays=data.splits["train"], spec=spec, optim=cfg.finetune, seed=cfg.seed, mesh=mesh,
      batch_sharding=sharding.batch_sharding(mesh), resume=cfg.resume,
      every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
      log_every=cfg.log_every_steps)
  workspace.export(workspace.with_params(model, params), tok, os.path.join(out, "export"))
  workspace.finish_training(cfg, out, fp)
  return out


def _teacher(cfg) -> str:
  return workspace.folder(cfg, "teacher")


STAGE = base.Stage(
    name="finetune", run=run, is_done=lambda cfg, inputs: is_done(cfg), where=_teacher,
    outputs=lambda cfg: [_teacher(cfg)], when_done=_teacher,
    prune=lambda cfg: workspace.prune_done(cfg, _teacher(cfg)))
