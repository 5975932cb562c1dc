"""Stage 2: "trustworthy maximisation" — the teacher temperature that minimises its ECE.

The fine-tuned teacher's top-k at each validation example's answer position gives one event,
scored as the evaluation scores every model (`evaluate.scoring`): `choices` — the re-scaled
top-k read at the answer letters and renormalised over them, confidence = the most likely
letter's probability, correct = it is the gold letter; `vocab` — the re-scaled top-1 over the
full vocabulary (+ tail bin), correct = it is the gold letter. `temperature.search` scans a grid
(then a finer one) in one compiled program, for every scaling mode and tail handling (each
student trains with the temperature searched for its own); the premise check (is the teacher
over-confident?), the ECE-vs-temperature curves and the share of probability mass inside the
top-k for k = 1..20 ("concentrated knowledge") go into the store manifest and PNGs.

Done-check: the manifest's `calibration_fingerprint` (written in the same atomic update as the
calibration block) is the `fingerprint` of the store the calibration was made for (its teacher,
data and k) and of the config keys the search reads; a re-run whose fingerprint matches logs
"calibrate: done already" and does nothing. `resume=false` calibrates again.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from first_jax.runtime import distributed, xla_options
from first_jax.runtime.errors import UserError
from first_jax.core import calibration, losses, temperature
from first_jax.data import store
from first_jax.engine import infer, plots, served, workspace
from first_jax.engine.job import Job
from first_jax.stages import base

log = logging.getLogger(__name__)
MAX_K_REPORT = served.REPORT_K  # the concentrated-knowledge report's k = 1..20


def answer_events(top: dict, arrays: dict) -> tuple[np.ndarray, ...]:
  """Top-k at each example's answer position, and the gold letter's token id."""
  rows = np.arange(len(arrays["answer_pos"]))
  pos = arrays["answer_pos"]
  gold = arrays["choice_ids"][rows, arrays["label"]]
  return (top["teacher_logprobs"][rows, pos], top["teacher_ids"][rows, pos],
          top["teacher_tail"][rows, pos], gold)


def token_events(top: dict, arrays: dict) -> tuple[np.ndarray, ...]:
  """Text: one event per scored (response) position: the top-k there and the next token."""
  at = arrays["loss_mask"] > 0
  return (top["teacher_logprobs"][at], top["teacher_ids"][at], top["teacher_tail"][at],
          arrays["targets"][at])


def run_searches(lp_NxK, ids_NxK, tail_N, gold_N, choice_NxC, *, num_bins: int,
                 refine: bool) -> dict[str, dict]:
  """The ECE search for every (scaling mode, tail handling) a student may train with.

  `choice_NxC` None: events scored on the full vocabulary's top-1; else over the choices.
  """
  out = {}
  args = [jnp.asarray(x) for x in (lp_NxK, ids_NxK, gold_N, tail_N)]
  choice = None if choice_NxC is None else jnp.asarray(choice_NxC)
  options = xla_options.fused_dots(next(iter(args[0].devices())).platform)
  for mode in temperature.MODES:
    for tail in losses.TAILS:
      res = jax.device_get(jax.jit(lambda a, b, c, d, e, mode=mode, tail=tail: temperature.search(
          a, b, c, mode=mode, num_bins=num_bins, refine=refine,
          tail_logmass_N=d if tail == "bucket" else None, choice_ids_NxC=e),
          compiler_options=options)(*args, choice))
      at1 = np.flatnonzero(res.temperatures_T == 1.0)
      out[store.search_key(mode, tail)] = {
          "best_t": float(res.best_t), "best_ece": float(res.best_ece),
          # the identity exists in log_space only (prob_softmax at t = 1 is not the teacher)
          "ece_at_identity": float(res.ece_T[at1[0]]) if mode == "log_space" and len(at1)
                             else None,
          "temperatures": res.temperatures_T.tolist(), "ece": res.ece_T.tolist(),
          "nll": res.nll_T.tolist(), "brier": res.brier_T.tolist()}
      log.info("calibrate %s: best t=%.4g ECE=%.4f", store.search_key(mode, tail), res.best_t,
               res.best_ece)
  return out


def premise(lp_NxK, ids_NxK, tail_N, gold_N, choice_NxC, searches: dict, tail: str,
            num_bins: int) -> dict:
  """FIRST's premise, in-domain: the fine-tuned teacher is over-confident on held-out data
  (mean confidence above accuracy) and the searched log_space temperature softens it (t > 1)."""
  choice = None if choice_NxC is None else jnp.asarray(choice_NxC)
  conf_N = np.asarray(temperature.event_confidence(lp_NxK, ids_NxK, 1.0, "log_space", tail_N,
                                                   choice))
  correct_N = np.asarray(temperature.event_correct(lp_NxK, ids_NxK, gold_N, choice))
  t_log = searches[store.search_key("log_space", tail)]["best_t"]
  out = {"teacher_val_confidence": float(conf_N.mean()),
         "teacher_val_accuracy": float(correct_N.mean()),
         "teacher_val_ece": float(calibration.ece(jnp.asarray(conf_N), jnp.asarray(correct_N),
                                                  num_bins)),
         "t_log_space": t_log, "t_prob_softmax": searches[store.search_key("prob_softmax", tail)][
             "best_t"], "tail": tail}
  out["holds"] = bool(out["teacher_val_confidence"] > out["teacher_val_accuracy"] and t_log > 1)
  return out


FINGERPRINT = "calibration_fingerprint"  # top-level store manifest key beside `calibration`


def fingerprint(job: Job, manifest: dict) -> str:
  """What a calibration depends on: the store it was made for (its teacher, data and k, as the
  manifest records them) and the config keys the search and its scoring read."""
  cfg = job.cfg
  return workspace.fingerprint(
      (manifest.get("teacher") or {}).get("fingerprint"), manifest.get("data_fingerprint"),
      manifest.get("k"), cfg.extract.k, cfg.calibrate, cfg.evaluate.scoring, cfg.distill.tail,
      cfg.data.kind)


def _manifest(job: Job) -> dict | None:
  return store.read_manifest(job.layout.store)


def is_done(job: Job) -> bool:
  """Whether the store's manifest holds a calibration of this config: a complete store of this
  config's teacher and data whose calibration_fingerprint matches `fingerprint`."""
  m = _manifest(job)
  if not (m and m.get("complete") and m.get("calibration")):
    return False
  if (m.get("teacher") or {}).get("fingerprint") != job.teacher_fingerprint:
    return False
  if m.get("data_fingerprint") != job.data_fingerprint:
    return False
  return m.get(FINGERPRINT) == fingerprint(job, m)


def _check_premise(job: Job, check: dict) -> None:
  if job.cfg.calibrate.require_premise and not check["holds"]:
    raise UserError(f"calibrate.require_premise: the teacher is not over-confident on validation "
                    f"(confidence {check['teacher_val_confidence']:.4f}, accuracy "
                    f"{check['teacher_val_accuracy']:.4f}, log_space t {check['t_log_space']:.3g}"
                    f"); fine-tune it longer (finetune.epochs) or set the key to false")


def run(job: Job) -> dict:
  out, cfg = job.layout.store, job.cfg
  store.StoreReader(out, verify=False)  # a clear error if extract has not written the store
  k, k_report = cfg.extract.k, max(MAX_K_REPORT, cfg.extract.k)
  text = cfg.data.kind == "text"
  # a served teacher is checked before anything (the data's split record) is written
  client = job.served_teacher() if cfg.teacher.source == "server" else None
  val = job.data.splits["validation"]
  if client is not None:
    top = client.topk_rows(val, k_report, not text, desc="calibrate")
  else:
    teacher = job.load_export(job.layout.teacher, "teacher").for_inference()
    mesh = job.mesh
    fn = infer.topk_program(teacher.module, teacher.params, k_report, not text, mesh)
    top = infer.topk_rows(fn, teacher.params, val, cfg.extract.batch_size, mesh,
                          desc="calibrate")
  lp_NxR, ids_NxR, _, gold_N = (token_events if text else answer_events)(top, val)
  mass_NxR = np.cumsum(np.exp(lp_NxR.astype(np.float64)), axis=-1)
  lp_NxK, ids_NxK = lp_NxR[:, :k], ids_NxR[:, :k]
  tail_N = np.log1p(-np.minimum(mass_NxR[:, k - 1], 1 - 1e-7)).astype(np.float32)
  # the events are scored as the evaluation scores models: text -> tokens (full vocabulary)
  scoring = "tokens" if text else cfg.evaluate.scoring
  choice_NxC = val["choice_ids"] if scoring == "choices" else None
  nb = cfg.calibrate.num_bins
  searches = run_searches(lp_NxK, ids_NxK, tail_N, gold_N, choice_NxC, num_bins=nb,
                          refine=cfg.calibrate.refine)
  tail = cfg.distill.tail
  main = distributed.is_main()  # every process holds the gathered events; process 0 writes
  for mode in temperature.MODES if main else ():
    res = searches[store.search_key(mode, tail)]
    plots.temperature_curve(os.path.join(out, f"calibration_{mode}.png"),
                            np.asarray(res["temperatures"]), np.asarray(res["ece"]),
                            res["best_t"], f"teacher ECE vs temperature ({mode}, {tail} tail, "
                            f"{scoring} scoring)")
  check = premise(lp_NxK, ids_NxK, tail_N, gold_N, choice_NxC, searches, tail, nb)
  block = {
      "scoring": scoring, "mode": cfg.calibrate.mode,
      "temperature": searches[store.search_key(cfg.calibrate.mode, tail)]["best_t"],
      "num_events": int(len(gold_N)), "num_bins": nb, "premise": check, "searches": searches,
      "teacher_top1_accuracy": float(np.mean(ids_NxK[:, 0] == gold_N)),
      "topk_mass_mean": mass_NxR.mean(axis=0).tolist(),  # k = 1..k_report
  }
  m = _manifest(job) or {}
  if main:
    plots.histogram(os.path.join(out, "topk_mass.png"), mass_NxR[:, k - 1], 20,
                    f"teacher probability mass inside the top-{k}",
                    f"concentrated knowledge (validation "
                    f"{'response tokens' if text else 'answers'})")
    # the block and its done-marker in one atomic manifest update: they cannot disagree
    store.update_manifest(out, calibration=block, **{FINGERPRINT: fingerprint(job, m)})
  distributed.sync("calibrate: manifest written")
  verdict = "HOLDS" if check["holds"] else "DOES NOT HOLD"
  log.info("premise %s: teacher validation confidence %.4f vs accuracy %.4f (%s scoring, %d "
           "events); searched log_space t=%.4g (%s)", verdict, check["teacher_val_confidence"],
           check["teacher_val_accuracy"], scoring, len(gold_N),
           check["t_log_space"], "softens" if check["t_log_space"] > 1 else "sharpens")
  _check_premise(job, check)
  return block


def _where(job: Job) -> str:
  m = _manifest(job) or {}
  return f"{os.path.join(job.layout.store, store.MANIFEST)}, {FINGERPRINT} {m.get(FINGERPRINT)}"


def _when_done(job: Job) -> dict:
  """The stored calibration block, its premise checked as a run checks it."""
  calibration = _manifest(job)["calibration"]
  _check_premise(job, calibration["premise"])
  return calibration


# its output is the store manifest's calibration: resume=false calibrates again (extract has
# moved the old store aside when the pipeline starts over)
STAGE = base.Stage(
    name="calibrate", run=run, is_done=is_done, where=_where, when_done=_when_done)
