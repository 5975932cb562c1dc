"""Shared recipes the shipped configs (configs/*.py) build on."""
from __future__ import annotations

import ml_collections

from first_jax.config.schema import base


def trust_regime(c: ml_collections.ConfigDict, student_seed: int,
                 epochs: int = 3) -> ml_collections.ConfigDict:
  """The trust studies' shared recipe (configs/trust*.py): teacher and every student `epochs`
  epochs (matched budget), students' batch order from `student_seed`, FIRST and the search in
  log space (t = 1 is the teacher as it is), no students from a teacher that fails the premise."""
  c.finetune.epochs = c.distill.epochs = epochs
  c.distill.seed = student_seed
  c.distill.temperature_mode = c.calibrate.mode = "log_space"
  c.calibrate.require_premise = True
  return c


def paper_scale(name: str, teacher: str, student: str, teacher_model: ml_collections.ConfigDict,
                student_model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's setting for a pre-trained teacher/student pair of local HF folders (`teacher`,
  `student`; the tokenizer is the teacher's): instruction data (an Alpaca-style JSONL, chat
  template), block 2048, k = 5, global batch 128 (16 rows x 8 accumulated steps), lr 2e-6,
  3 epochs, cosine with 3% warmup, an FSDP mesh over 8 devices. The model blocks carry the
  architectures (the plan sizes the programs from them; a run reads them from the folders)."""
  c = base()
  c.workdir = f"workdir/{name}"
  c.tokenizer = teacher
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  c.data.kind, c.data.source, c.data.task = "text", "hf", "/data/alpaca.jsonl"
  c.data.max_len = 2048
  c.data.use_chat_template = True
  c.data.validation, c.data.test = 0.02, 0.02
  c.teacher.init, c.teacher.path, c.teacher.model = "pretrained", teacher, teacher_model
  c.student.init, c.student.path, c.student.model = "pretrained", student, student_model
  optim = dict(lr=2e-6, epochs=3, batch_size=16, grad_accum=8, warmup_ratio=0.03,
               weight_decay=0.0, clip_norm=1.0)
  c.finetune.update(optim)
  c.distill.update(optim)
  c.extract.k = 5
  c.extract.batch_size = 16
  c.evaluate.batch_size = 16
  c.checkpoint.every_steps = 200
  c.students = ("sft", "kd", "first")
  return c
