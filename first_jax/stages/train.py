"""Stage 3: train the student variants listed in `config.students`, all through one trainer.

  sft        cross-entropy on the answers (the fine-tuned student baseline)
  sft_ls     cross-entropy with label smoothing `distill.label_smoothing` over the vocabulary;
             `sft_ls-choices` smooths over the answer letters (where the evaluation looks)
  kd         top-k KD on the teacher's raw top-k (no temperature): plain distillation
  first      FIRST: top-k KD on the teacher's top-k re-scaled by the calibrated temperature
  full_kd    full-vocabulary KD from the teacher running inside the step (reference)
  kd-sampled     KD on a priority sample of the teacher's full distribution at T = 1 (a sampled
                 store: the sample stage; unbiased where top-k is not, first_jax.core.sampled)
  first-sampled  the same at FIRST's calibrated temperature (log_space: softmax(logits / T)
                 over the whole vocabulary; the calibrate stage's log_space-bucket search)
`kd` and `first` take optional suffixes overriding the scaling mode and tail handling, e.g.
`first-log_space`, `first-renormalize`, `kd-renormalize`. Any variant takes `@E` for E epochs
instead of `distill.epochs` (e.g. `sft@1`: the evaluation picks the SFT epoch count on
validation among `sft@E` and `sft`). With `distill.mode = online` the teacher runs inside the
jitted step (forward under stop_gradient, top-k, optional in-step ECE temperature search,
rescale and KL in one XLA program) instead of reading the store.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
import numpy as np

from first_jax.runtime.errors import UserError
from first_jax.core import losses, step, temperature
from first_jax.data import store
from first_jax.engine import job as job_lib, workspace
from first_jax.engine.job import Job
from first_jax.stages import base

log = logging.getLogger(__name__)
_MODES = temperature.MODES
_TAILS = losses.TAILS


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  spec: step.LossSpec
  needs_teacher: bool  # reads the store (offline) or runs the teacher (online)
  epochs: int | None = None  # `name@E`: trained E epochs instead of distill.epochs


def parse_variant(name: str, cfg) -> Variant:
  """A student variant name -> its loss (see the module docstring)."""
  name_only, at, epochs = name.partition("@")
  if at:
    if not epochs.isdigit() or int(epochs) < 1:
      raise UserError(f"config.students: {name!r}: expected name@E with E epochs >= 1")
    return dataclasses.replace(parse_variant(name_only, cfg), name=name, epochs=int(epochs))
  base, *mods = name.split("-")
  d = cfg.distill
  answer_only = job_lib.answer_only(cfg)
  if base == "sft_ls" and mods in ([], ["choices"]):
    return Variant(name, step.LossSpec(kind="ce", label_smoothing=d.label_smoothing,
                                       smooth_over="choices" if mods else "vocab",
                                       answer_only=answer_only), False)
  online = d.mode == "online"
  if "sampled" in mods:
    return _sampled_variant(name, base, [m for m in mods if m != "sampled"], cfg, online,
                            answer_only)
  mode, tail = d.temperature_mode, d.tail
  for m in mods:
    if m in _MODES:
      mode = m
    elif m in _TAILS:
      tail = m
    else:
      raise UserError(f"config.students: unknown modifier {m!r} in {name!r} "
                      f"(expected one of {_MODES + _TAILS + ('sampled',)})")
  kd = dict(kind="topk_kd", k=cfg.extract.k, tail=tail, direction=d.direction, online=online,
            num_bins=cfg.calibrate.num_bins, answer_only=answer_only)
  if base == "sft" and not mods:
    return Variant(name, step.LossSpec(kind="ce", answer_only=answer_only), False)
  if base == "kd":
    return Variant(name, step.LossSpec(temperature_mode=None, **kd), True)
  if base == "first":
    search = d.temperature == "search"
    if search and not online:
      raise UserError("config.distill.temperature: 'search' runs inside the online step; set "
                      "distill.mode=online or use 'calibrated' / a number")
    return Variant(name, step.LossSpec(
        temperature_mode=mode, search=search, ema=d.temperature_ema,
        search_events=d.search_events, search_min_events=d.search_min_events,
        search_choices=cfg.evaluate.scoring == "choices" and answer_only, **kd), True)
  if base == "full_kd" and not mods:
    return Variant(name, step.LossSpec(kind="full_kd", online=True, answer_only=answer_only),
                   True)
  raise UserError(f"config.students: unknown student variant {name!r} "
                  f"(expected sft, sft_ls[-choices], kd[-mods], first[-mods], full_kd)")


def _sampled_variant(name: str, base: str, mods: list[str], cfg, online: bool,
                     answer_only: bool) -> Variant:
  """kd-sampled / first-sampled: the forward KL on a priority sample of the teacher."""
  d = cfg.distill
  if base not in ("kd", "first") or any(m != "log_space" for m in mods):
    raise UserError(f"config.students: {name!r}: sampled targets are kd-sampled or "
                    f"first-sampled (optionally -log_space)")
  if d.direction != "forward":
    raise UserError(f"config.students: {name!r}: sampled targets estimate the forward KL; "
                    f"set distill.direction=forward (got {d.direction!r})")
  if base == "first" and d.temperature == "search":
    raise UserError(f"config.students: {name!r}: the temperature of sampled targets is fixed "
                    f"before they are drawn; set distill.temperature to calibrated or a number")
  if base == "first" and d.temperature_mode != "log_space" and "log_space" not in mods:
    raise UserError(f"config.students: {name!r}: a temperature over the whole vocabulary is "
                    f"log_space's softmax(logits / T); set distill.temperature_mode=log_space "
                    f"or name it first-sampled-log_space")
  return Variant(name, step.LossSpec(
      kind="sampled_kd", temperature_mode=None if base == "kd" else "log_space", tail="bucket",
      online=online, answer_only=answer_only, samples=cfg.extract.samples,
      sample_seed=cfg.extract.sample_seed), True)


def teacher_temperature(job: Job, spec: step.LossSpec) -> float:
  """The temperature of a FIRST run: calibrated, or a number from the config; with the online
  search, its start value (the offline calibration's where one exists, else 1)."""
  if spec.kind not in ("topk_kd", "sampled_kd") or spec.temperature_mode is None:
    return 1.0
  t = job.cfg.distill.temperature
  if t not in ("calibrated", "search"):
    return float(t)  # a positive number: checked at start-up (config.validate)
  path = job.layout.store
  calib = None
  if os.path.exists(os.path.join(path, store.MANIFEST)):
    calib = store.StoreReader(path, verify=False).calibration
  key = store.search_key(spec.temperature_mode, spec.tail)  # this variant's own search
  if spec.search:
    return float(calib["searches"][key]["best_t"]) if calib and key in calib.get(
        "searches", {}) else 1.0
  if not calib:
    raise UserError(f"{path}: no calibration in the store manifest (run first_jax.calibrate "
                    f"first)")
  if key not in calib.get("searches", {}):
    raise UserError(f"{path}: the calibration has no search for {key} (re-run "
                    f"first_jax.calibrate)")
  return float(calib["searches"][key]["best_t"])


def sampling(job: Job, t: float) -> dict:
  """The `sampling` block of the store a sampled student reads (the sample stage writes it)."""
  return {"sampler": "priority", "temperature": t, "mode": "log_space",
          "seed": job.cfg.extract.sample_seed}


def store_path(job: Job, spec: step.LossSpec, t: float) -> str:
  """The store a KD student reads: the top-k store, or the sampled store of its temperature."""
  return job.layout.sampled(t) if spec.kind == "sampled_kd" else job.layout.store


def open_store(job: Job, spec: step.LossSpec, t: float) -> store.StoreReader:
  """The student's store, complete and (sampled) drawn as this run says."""
  path = store_path(job, spec, t)
  stage = "sample" if spec.kind == "sampled_kd" else "extract"
  reader = store.StoreReader(path)
  if not reader.manifest.get("complete"):
    raise UserError(f"{reader.store_dir}: the store is incomplete (its {stage} stage did not "
                    f"finish); re-run first_jax.{stage} to complete it")
  if spec.kind == "sampled_kd":
    want = sampling(job, t)
    if reader.spec.sampling != want or reader.spec.k != spec.samples:
      raise UserError(f"{path}: drawn with {reader.spec.sampling} and {reader.spec.k} tokens, "
                      f"this run wants {want} and {spec.samples}; re-run first_jax.sample")
  return reader


def store_targets(reader: store.StoreReader):
  """Adds the teacher's stored top-k to a host batch, checking it is the same data."""
  def add(batch: dict) -> dict:
    rec = reader.read(batch["example_id"])
    if not np.array_equal(rec["token_hash_N"], store.token_hash(batch["input_ids"])):
      raise UserError("store: token ids differ from the data batch (store built from other "
                      "data; re-run extract into a new store)")
    return {**batch, "teacher_ids": rec["ids_NxLxK"], "teacher_logprobs": rec["logprobs_NxLxK"],
            "teacher_tail": rec["tail_logmass_NxL"]}
  return add


def student_seed(cfg) -> int:
  """The students' seed: `distill.seed`, or the run's seed when it is -1."""
  return cfg.distill.seed if cfg.distill.seed >= 0 else cfg.seed


def variant_fingerprint(job: Job, variant: Variant, t: float) -> str:
  """What a student run depends on: data, student, distillation, and (for KD) the teacher."""
  cfg, teacher = job.cfg, job.teacher_fingerprint if variant.needs_teacher else None
  return workspace.fingerprint(cfg.seed, cfg.tokenizer, job.data_block, cfg.student,
                               cfg.distill, cfg.extract.k, dataclasses.asdict(variant.spec),
                               teacher, t,
                               *([variant.epochs] if variant.epochs else []))


def is_done(job: Job, variant: Variant) -> bool:
  fp = variant_fingerprint(job, variant, teacher_temperature(job, variant.spec))
  return workspace.is_done(job.layout.student(variant.name), fp)


def train_variant(job: Job, variant: Variant) -> str:
  out, spec, cfg = job.layout.student(variant.name), variant.spec, job.cfg
  if is_done(job, variant):
    log.info("train %s: done already", variant.name)
    job.prune_done(out)  # finishes a pruning a kill interrupted
    return out
  t = teacher_temperature(job, spec)
  fp = variant_fingerprint(job, variant, t)
  train = job.data.splits["train"]  # the data (and its errors) before any model loads
  reader = None
  if variant.needs_teacher and not spec.online:  # opened (and verified) only for work to do
    reader = open_store(job, spec, t)
  optim = cfg.distill
  if variant.epochs:  # the same optimiser and schedule shape over fewer (or more) epochs
    optim = ml_collections.ConfigDict({**cfg.distill.to_dict(), "epochs": variant.epochs})
  teacher = {}
  if spec.online:
    model = job.load_export(job.layout.teacher, "teacher")
    teacher = dict(teacher_module=model.module, teacher_params=model.params)
  if reader is not None:
    teacher = dict(add_targets=store_targets(reader))
  log.info("train %s: %s, teacher temperature %s", variant.name, spec,
           f"searched in-step from {t:.4g}" if spec.search else f"{t:.4g}")
  student = job.init_model("student")
  workspace.start_run(out, fp)
  params = job.train(f"train/{variant.name}", out, student, train, spec, optim,
                     seed=student_seed(cfg), initial_temperature=t, **teacher)
  job.export(student, params, out)
  job.finish_training(out, fp, temperature=t)
  return out


def run_checks(cfg) -> list[Variant]:
  return [parse_variant(name, cfg) for name in cfg.students]


def run(job: Job) -> list[str]:
  variants = run_checks(job.cfg)  # all checked before any work
  return [train_variant(job, v) for v in variants]


def _students(job: Job) -> list[str]:
  return [job.layout.student(name) for name in job.cfg.students]


def _prune(job: Job) -> None:
  for path in _students(job):
    job.prune_done(path)


# each student is its own run: a stage with some students done trains the others only
STAGE = base.Stage(
    name="train", run=run,
    is_done=lambda job: all(is_done(job, v) for v in run_checks(job.cfg)),
    where=lambda job: ", ".join(_students(job)), outputs=_students, when_done=_students,
    prune=_prune)
