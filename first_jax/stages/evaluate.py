"""Stage 4: accuracy and calibration of every model, in-domain and out-of-domain.

Each model is scored at each example's answer position (the output head runs there only), and
read two ways; `evaluate.scoring` picks the headline one, the one the temperature search and the
post-hoc fits also use (results carry both):
  choices  softmax over the answer letters' log-probs (lm-eval-harness style): the most likely
           letter is the prediction, its probability the confidence; Brier and NLL over the
           letters
  vocab    the reference code's way: the full-vocabulary top-1 token is the prediction (correct
           if it is the gold letter), its probability the confidence; Brier and NLL of that
           binary event
Metrics: accuracy, mean confidence, ECE (10 and 15 bins, equal-width and equal-mass), MCE, Brier,
NLL, reliability bins. Rows: the pre-trained and fine-tuned teacher, every trained student, and
`<student>+ts` for each student in `evaluate.post_hoc` (post-hoc temperature scaling fitted by NLL
on the validation split, under the same scoring), and `sft@val`, the SFT student among `sft` and
`sft@E` (E epochs) with the lowest validation NLL, when several were trained. Writes
eval/results.json (metrics), eval/events.json (per-example confidence and correctness, for bootstrap
intervals), eval/results.md and reliability diagrams. Scores are cached per model in eval/scores/,
keyed by the model's and the data's fingerprints, so a re-run only scores what changed.

Done-check: eval/done.json holds the `fingerprint` of everything the evaluation read (the data,
the out-of-domain and choice-task settings, the `evaluate` block and the fingerprint of every
model scored); a re-run whose fingerprint matches prints the stored table, logs "evaluate: done
already" and scores nothing. `resume=false` moves eval/ aside and evaluates from nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from first_jax.runtime import distributed, io_util
from first_jax.core import calibration, step, temperature, topk
from first_jax import models
from first_jax.engine import infer, plots, textscore, workspace
from first_jax.engine.job import Job, pretrained_teacher_fingerprint
from first_jax.stages import base

log = logging.getLogger(__name__)
HEADLINE = ("accuracy", "ece", "mce", "brier", "nll")
TOP_R = 20  # full-vocabulary top tokens kept per example (vocab scoring at t != 1: + tail bin)


def answer_scores(params: Any, batch: dict[str, jax.Array], *,
                  apply: step.Apply) -> dict[str, jax.Array]:
  """Log-probabilities at each example's answer position, the output head run there only.

  Returns top_logprobs_BxR / top_ids_BxR (the full vocabulary's top TOP_R) and
  choice_logprobs_BxC (full-vocabulary log-probs of the choice letters; -inf for padding -1).
  """
  spec = step.LossSpec(answer_only=True)
  logits_BxV = step.student_logits(params, batch, apply, spec)[:, 0].astype(jnp.float32)
  logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  choice_ids_BxC = batch["choice_ids"]
  choice_BxC = jnp.take_along_axis(logprobs_BxV, jnp.maximum(choice_ids_BxC, 0), axis=-1)
  choice_BxC = jnp.where(choice_ids_BxC >= 0, choice_BxC, -jnp.inf)
  top_BxR, ids_BxR = jax.lax.top_k(logprobs_BxV, TOP_R)
  return {"top_logprobs": top_BxR, "top_ids": ids_BxR.astype(jnp.int32),
          "choice_logprobs": choice_BxC}


def scorer(model, mesh):
  """The jitted answer-position scoring of `model` (one per model, reused for every set)."""
  return infer.jit(functools.partial(answer_scores, apply=models.apply_fn(model.module)),
                   model.params, mesh)


def score(fn, model, arrays: dict, batch_size: int, mesh,
          length_buckets: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """Answer-position scores of `model` on every row of `arrays` (in their order), gathered to
  every process. With `length_buckets` the rows are scored shortest first and each batch's
  padding is cut to a bucket (exact for the causal model), one compile per bucket."""
  out = infer.map_rows(fn, model.params, arrays,
                       keys=("input_ids", "attention_mask", "answer_pos", "choice_ids"),
                       batch_size=batch_size, mesh=mesh, desc="score",
                       length_buckets=length_buckets, shortest_first=bool(length_buckets))
  out.pop("row")
  return out


def _tail(top_NxR: np.ndarray) -> jax.Array:
  """Log-mass outside the top TOP_R tokens."""
  return topk.log1mexp(jax.nn.logsumexp(jnp.asarray(top_NxR, jnp.float32), axis=-1))


def events(scores: dict, arrays: dict, scoring: str, t: float = 1.0) -> dict[str, np.ndarray]:
  """Per-example confidence, correctness, and class log-probs under `scoring` at temperature t.

  choices: log_softmax(choice log-probs / t) (temperature scaling of the letters' logits).
  vocab: the top-1 of the full vocabulary's top TOP_R + tail, re-scaled in log space (t = 1:
  the model's own top-1 probability); its "classes" are (top-1, rest).
  """
  label_N = np.asarray(arrays["label"])
  if scoring == "choices":
    lp_NxC = np.asarray(jax.nn.log_softmax(jnp.asarray(scores["choice_logprobs"]) / t, axis=-1))
    return {"confidence": np.exp(lp_NxC.max(-1)),
            "correct": (lp_NxC.argmax(-1) == label_N).astype(np.float32),
            "logprobs": lp_NxC, "label": label_N}
  gold_N = np.asarray(arrays["choice_ids"])[np.arange(len(label_N)), label_N]
  top_NxR, ids_NxR = scores["top_logprobs"], scores["top_ids"]
  conf_N = np.asarray(temperature.event_confidence(top_NxR, ids_NxR, t, "log_space",
                                                   _tail(top_NxR)), np.float64)
  correct_N = (ids_NxR[:, 0] == gold_N).astype(np.float32)
  conf_N = np.clip(conf_N, 1e-12, 1 - 1e-12)
  lp_Nx2 = np.log(np.stack([conf_N, 1 - conf_N], -1))
  return {"confidence": conf_N.astype(np.float32), "correct": correct_N, "logprobs": lp_Nx2,
          "label": (1 - correct_N).astype(np.int32)}  # class 0 = "the top-1 is right"


def metrics(ev: dict[str, np.ndarray], num_bins: tuple[int, ...]) -> dict[str, Any]:
  """Calibration metrics of one model on one set, from `events`."""
  conf_N, correct_N = jnp.asarray(ev["confidence"]), jnp.asarray(ev["correct"])
  lp = jnp.asarray(ev["logprobs"], jnp.float32)
  label_N = jnp.asarray(ev["label"])
  out: dict[str, Any] = {
      "n": int(len(correct_N)), "accuracy": float(correct_N.mean()),
      "confidence": float(conf_N.mean()), "brier": float(calibration.brier(jnp.exp(lp), label_N)),
      "nll": float(calibration.nll(lp, label_N))}
  out.update(calibration.summary(conf_N, correct_N, num_bins))
  return out


HUMAN = ("human_kl", "human_ece", "human_agreement")


def human_metrics(scores: dict, arrays: dict, t: float, num_bins: tuple[int, ...]
                  ) -> dict[str, float]:
  """How a model's distribution over the choices (softmax of the choice log-probs at t) stands
  against the raters', where the data carries one (`human` [N, C], VADER's):
    human_kl         mean KL(human || model) in nats: 0 when the model's probabilities are the
                     shares of people who chose each answer
    human_ece        ECE (equal width, the first bin count) of the model's confidence against
                     the share of raters who chose the model's prediction (agreement in place
                     of correctness)
    human_agreement  the mean of that share (the accuracy counterpart)
  Rows without raters (NaN) are left out; `human_n` counts the rows used."""
  h_NxC = np.asarray(arrays["human"], np.float64)
  keep_N = np.isfinite(h_NxC).all(-1)
  h_NxC = h_NxC[keep_N]
  lp_NxC = np.asarray(jax.nn.log_softmax(jnp.asarray(scores["choice_logprobs"]) / t, axis=-1),
                      np.float64)[keep_N]
  rated_NxC = h_NxC > 0  # 0 log 0 = 0, whatever the model gives that answer
  kl_N = (h_NxC * (np.log(np.where(rated_NxC, h_NxC, 1.0))
                   - np.where(rated_NxC, lp_NxC, 0.0))).sum(-1)
  pred_N = lp_NxC.argmax(-1)
  agree_N = h_NxC[np.arange(len(pred_N)), pred_N]
  conf_N = np.exp(lp_NxC.max(-1))
  return {"human_n": int(keep_N.sum()), "human_kl": float(kl_N.mean()),
          "human_ece": float(calibration.ece(jnp.asarray(conf_N, jnp.float32),
                                             jnp.asarray(agree_N, jnp.float32), num_bins[0])),
          "human_agreement": float(agree_N.mean())}


def human_table(results: dict, sets: list[str]) -> str:
  """Markdown: the `human_metrics` of each model on each set that has them."""
  sets = [s for s in sets if any("human_kl" in r.get(s, {}) for r in results.values())]
  if not sets:
    return ""
  head = ["model"] + [f"{s.removeprefix('ood:')} {m}" for s in sets for m in HUMAN]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    lines.append("| " + " | ".join([name] + [f"{r[s][m]:.4f}" for s in sets for m in HUMAN])
                 + " |")
  return "\n".join(lines) + "\n"


def both_scorings(scores: dict, arrays: dict, scoring: str, nb: tuple[int, ...],
                  t: float = 1.0) -> tuple[dict, dict]:
  """(metrics under `scoring` + the other scoring's summary, that scoring's events)."""
  main = events(scores, arrays, scoring, t)
  out = metrics(main, nb)
  out["scoring"] = scoring
  other = "vocab" if scoring == "choices" else "choices"
  m = metrics(events(scores, arrays, other, t), nb)
  # equal-mass ECE at the first bin count (ece10_mass with the default num_bins (10, 15))
  out[other] = {k: m[k] for k in ("accuracy", "confidence", "ece", f"ece{nb[0]}_mass", "mce",
                                  "brier", "nll")}
  return out, main


def fit_post_hoc(scores: dict, arrays: dict, scoring: str) -> float:
  """Post-hoc temperature minimising the NLL of the scoring's events on `arrays` (validation)."""
  label_N = jnp.asarray(arrays["label"])
  if scoring == "choices":
    return float(temperature.fit_nll_temperature_logits(
        jnp.asarray(scores["choice_logprobs"]), label_N).t)
  gold_N = np.asarray(arrays["choice_ids"])[np.arange(len(label_N)), np.asarray(label_N)]
  top_NxR = scores["top_logprobs"]
  return float(temperature.fit_nll_temperature(
      jnp.asarray(top_NxR), jnp.asarray(scores["top_ids"]), jnp.asarray(gold_N),
      mode="log_space", tail_logmass_N=_tail(top_NxR)).t)


def path_fingerprint(path: str) -> str:
  """A model given by path (`evaluate.models`): its config.json's bytes and the size and mtime
  of each weights file (*.safetensors, *.gguf; a .gguf file itself), so that a model rewritten
  in place is evaluated again without hashing gigabytes."""
  h = hashlib.sha256()
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
      with open(config, "rb") as f:
        h.update(f.read())
    files = [os.path.join(path, n) for n in names if n.endswith((".safetensors", ".gguf"))]
  else:
    files = [path]
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _models(job: Job) -> dict[str, tuple[Callable, str | None]]:
  """Name -> (loader, fingerprint of the model or None: not cached) of every model found."""
  cfg = job.cfg
  found = {"teacher_pretrained": (functools.partial(job.init_model, "teacher"),
                                  pretrained_teacher_fingerprint(cfg))}
  teacher = job.layout.teacher
  if os.path.exists(os.path.join(teacher, "export", "config.json")):
    found["teacher"] = (functools.partial(job.load_export, teacher, "teacher"),
                        workspace.done_fingerprint(teacher))
  for name in cfg.students:
    path = job.layout.student(name)
    if os.path.exists(os.path.join(path, "export", "config.json")):
      found[name] = (functools.partial(job.load_export, path), workspace.done_fingerprint(path))
  for path in cfg.evaluate.models:
    found[os.path.basename(os.path.normpath(path))] = (
        lambda path=path: models.load_pretrained(path, mesh=job.mesh), None)
  return found


def data_key(cfg, data_fingerprint: str) -> str:
  """The evaluation sets as the score cache and the done-check key them: the in-domain data's
  fingerprint and the settings that choose the out-of-domain and choice-task sets (kind=text:
  also the temperature grid every token is scored at)."""
  if cfg.data.kind == "text":
    t_T = textscore.grid(*cfg.evaluate.post_hoc_grid)
    return workspace.fingerprint(data_fingerprint, cfg.data.ood_tasks, cfg.data.num_ood_examples,
                                 cfg.evaluate.choice_tasks, cfg.data.answer_template,
                                 t_T.tolist())
  return workspace.fingerprint(data_fingerprint, cfg.data.ood_tasks, cfg.data.num_ood_examples,
                               TOP_R)


def model_fingerprints(cfg, found: dict[str, tuple[Callable, str | None]]) -> dict[str, Any]:
  """Name -> fingerprint of every model an evaluation of `cfg` scores: the done.json fingerprint
  of the workdir's teacher and students (None when missing or damaged), `path_fingerprint` of
  each `evaluate.models` path."""
  out: dict[str, Any] = {name: fp for name, (_, fp) in found.items()}
  for path in cfg.evaluate.models:
    out[os.path.basename(os.path.normpath(path))] = path_fingerprint(path)
  return out


def fingerprint(job: Job, model_fps: dict[str, Any]) -> str:
  """What an evaluation depends on (its done-marker): the sets (`data_key`, the data config and
  seed that split them, the tokenizer), the `evaluate` block and every model's fingerprint."""
  cfg = job.cfg
  return workspace.fingerprint(data_key(cfg, job.data_fingerprint), job.data_block, cfg.seed,
                               cfg.tokenizer, cfg.evaluate, model_fps)


def is_done(job: Job) -> bool:
  """Whether eval/ holds the results of an evaluation of exactly these data, settings and
  models (eval/done.json's fingerprint matches and results.json exists)."""
  out = job.layout.eval
  if not os.path.exists(os.path.join(out, "done.json")):
    return False
  fps = model_fingerprints(job.cfg, _models(job))
  return _done(out, fps, fingerprint(job, fps))


def _done(out: str, model_fps: dict[str, Any], fp: str) -> bool:
  # a workdir model without a readable done-marker (None) is never taken as evaluated
  return (all(v is not None for v in model_fps.values())
          and os.path.exists(os.path.join(out, "results.json")) and workspace.is_done(out, fp))


def report(job: Job) -> dict:
  """Prints the stored table of a finished evaluation and returns its results."""
  out = job.layout.eval
  with open(os.path.join(out, "results.json")) as f:
    doc = json.load(f)
  md_path = os.path.join(out, "results.md")
  if os.path.exists(md_path):
    with open(md_path) as f:
      md = f.read()
    print(f"scoring: {doc.get('scoring')}")
    print(md)
  print(f"results: {os.path.join(out, 'results.json')}; plots: {out}")
  return doc["results"]


def cached_scores(cache_dir: str, name: str, key: str | None,
                  compute: Callable[[], dict[str, dict]]) -> dict[str, dict]:
  """{set: scores} from eval/scores/<name>.npz when its key matches, else computed and saved."""
  path = os.path.join(cache_dir, f"{name}.npz")
  if key is not None and os.path.exists(path):
    with np.load(path) as z:
      if str(z["key"]) == key:
        out: dict[str, dict] = {}
        for k in z.files:
          if k != "key":
            s, field = k.split("|")
            out.setdefault(s, {})[field] = z[k]
        log.info("evaluate %s: scores cached (%s)", name, path)
        return out
  out = compute()
  if key is not None and distributed.is_main():  # every process holds the gathered scores
    flat = {f"{s}|{f}": v for s, d in out.items() for f, v in d.items()}
    io_util.atomic_write_npz(path, key=np.asarray(key), **flat)
  return out


def table(results: dict, in_domain: str, ood: list[str], label: str = "ID") -> str:
  """Markdown: headline metrics in-domain (or on the set `in_domain`, columns named `label`)
  and the mean over out-of-domain sets."""
  head = ["model"] + [f"{label} {m}" for m in HEADLINE] + ([f"OOD {m}" for m in HEADLINE] if ood
                                                         else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, sets in results.items():
    row = [name] + [f"{sets[in_domain][m]:.4f}" for m in HEADLINE]
    if ood:
      row += [f"{np.mean([sets[o][m] for o in ood]):.4f}" for m in HEADLINE]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def _compact(ev: dict[str, np.ndarray]) -> dict[str, list]:
  return {"confidence": np.round(ev["confidence"].astype(np.float64), 5).tolist(),
          "correct": ev["correct"].astype(int).tolist()}


class _Choice:
  """Multiple-choice data: each row scored at its answer position (`answer_scores`)."""

  def __init__(self, job: Job):
    cfg, data = job.cfg, job.data
    self.cfg, self.nb, self.scoring = cfg, tuple(cfg.evaluate.num_bins), cfg.evaluate.scoring
    self.sets = {"in_domain": data.splits["test"],
                 **{f"ood:{k}": v for k, v in data.ood.items()},
                 "validation": data.splits["validation"]}
    self.key = data_key(cfg, data.fingerprint)

  def compute(self, model, mesh) -> dict[str, dict]:
    fn = scorer(model, mesh)
    return {s: score(fn, model, arrays, self.cfg.evaluate.batch_size, mesh,
                     tuple(self.cfg.distill.length_buckets)) for s, arrays in self.sets.items()}

  def identity(self) -> float:
    return 1.0

  def val_nll(self, scored: dict) -> float:
    return metrics(events(scored["validation"], self.sets["validation"], self.scoring),
                   self.nb)["nll"]

  def fit(self, scored: dict) -> float:
    return fit_post_hoc(scored["validation"], self.sets["validation"], self.scoring)

  def result(self, scored: dict, s: str, t: float, post_hoc: bool) -> tuple[dict, dict]:
    out, ev = both_scorings(scored[s], self.sets[s], self.scoring, self.nb, t)
    if "human" in self.sets[s]:  # raters' label distributions (VADER)
      out.update(human_metrics(scored[s], self.sets[s], t, self.nb))
    if post_hoc:
      out["temperature"] = t
    return out, _compact(ev)


class _Text:
  """Text data: every response token scored (`first_jax.engine.textscore`), at each temperature of
  `evaluate.post_hoc_grid`; `evaluate.choice_tasks` scored by their choices' log-likelihood."""

  def __init__(self, job: Job):
    cfg, data = job.cfg, job.data
    self.cfg, self.nb, self.scoring = cfg, tuple(cfg.evaluate.num_bins), "tokens"
    self.t_T = textscore.grid(*cfg.evaluate.post_hoc_grid)
    self.choice = {f"choice:{k}": v for k, v in job.choice_tasks().items()}
    self.sets = {"in_domain": data.splits["test"],
                 **{f"ood:{k}": v for k, v in data.ood.items()},
                 **{s: v["rows"] for s, v in self.choice.items()},
                 "validation": data.splits["validation"]}
    self.key = data_key(cfg, data.fingerprint)

  def compute(self, model, mesh) -> dict[str, dict]:
    fn = textscore.scorer(model, self.t_T, mesh)
    return {s: textscore.score(fn, model, arrays, self.cfg.evaluate.batch_size, mesh,
                               tuple(self.cfg.distill.length_buckets))
            for s, arrays in self.sets.items()}

  def identity(self) -> int:
    return int(np.flatnonzero(self.t_T == 1.0)[0])

  def val_nll(self, scored: dict) -> float:
    return float(np.mean(textscore.token_events(scored["validation"], self.t_T,
                                                self.identity())["nll"]))

  def fit(self, scored: dict) -> int:
    return textscore.fit_post_hoc(scored["validation"], self.t_T)

  def result(self, scored: dict, s: str, j: int, post_hoc: bool) -> tuple[dict, dict]:
    if s in self.choice:
      c = self.choice[s]
      ev = textscore.choice_events(scored[s], c["rows"]["group"], c["label"], self.t_T, j)
      out, compact = metrics(ev, self.nb), _compact(ev)
      out["scoring"] = "choice log-likelihood"
    else:
      ev = textscore.token_events(scored[s], self.t_T, j)
      out = textscore.token_metrics(ev, self.nb)
      compact = {**_compact(ev), "row": ev["row"].tolist()}
      out["scoring"] = "tokens"
    if post_hoc:
      out["temperature"] = float(self.t_T[j])
    return out, compact


def run(job: Job) -> dict:
  out, cfg = job.layout.eval, job.cfg
  found = _models(job)
  model_fps = model_fingerprints(cfg, found)
  done_fp = fingerprint(job, model_fps)
  if distributed.is_main():  # the only writer of eval/
    if os.path.exists(os.path.join(out, "done.json")):
      os.remove(os.path.join(out, "done.json"))  # results of another evaluation: not done now
    for folder in (out, os.path.join(out, "scores")):  # what a killed write left half-written
      io_util.remove_stale_temps(folder)
  data = job.data
  kind = (_Text if data.kind == "text" else _Choice)(job)
  mesh = job.mesh
  results: dict[str, dict] = {}
  per_example: dict[str, dict] = {}
  val_nll: dict[str, float] = {}
  for name, (load, model_fp) in found.items():
    key = None if model_fp is None else f"{model_fp}/{kind.key}"
    scored = cached_scores(os.path.join(out, "scores"), name, key,
                           lambda load=load: kind.compute(load().for_inference(), mesh))
    val_nll[name] = kind.val_nll(scored)
    rows = {name: kind.identity()}
    if name in cfg.evaluate.post_hoc:  # + post-hoc temperature scaling, fitted on validation
      rows[f"{name}+ts"] = kind.fit(scored)
    for row, t in rows.items():
      results[row], per_example[row] = {}, {}
      for s in kind.sets:
        if s != "validation":
          results[row][s], per_example[row][s] = kind.result(scored, s, t, row != name)
      log.info("evaluate %s: ID accuracy %.4f ECE %.4f (%s scoring)", row,
               results[row]["in_domain"]["accuracy"], results[row]["in_domain"]["ece"],
               kind.scoring)
  sft_runs = [r for r in val_nll if r == "sft" or r.startswith("sft@")]
  if len(sft_runs) > 1:  # the SFT student whose epoch count validation NLL prefers
    best = min(sft_runs, key=val_nll.get)
    results["sft@val"] = {s: {**r, "chosen": best} for s, r in results[best].items()}
    per_example["sft@val"] = per_example[best]
    log.info("evaluate sft@val: %s (validation NLL %s)", best,
             {r: round(val_nll[r], 4) for r in sft_runs})
  ood = [s for s in kind.sets if s.startswith("ood:")]
  md = table(results, "in_domain", ood)
  humans = human_table(results, ["in_domain", *ood])
  if humans:
    md += ("\nAgainst the human raters (choice probabilities vs the share of raters choosing "
           "each answer; KL in nats, ECE of confidence against agreement)\n\n" + humans)
  for s in (s for s in kind.sets if s.startswith("choice:")):
    md += (f"\n{s} (log-likelihood of each choice's text)\n\n"
           + table(results, s, [], label=s.partition(":")[2]))
  if distributed.is_main():  # the reports: every process computed the same (gathered) rows
    io_util.atomic_write_json(os.path.join(out, "results.json"),
                              {"results": results, "in_domain": cfg.data.task or cfg.data.source,
                               "ood": ood, "scoring": kind.scoring, "kind": data.kind})
    io_util.atomic_write_json(os.path.join(out, "events.json"),
                              {"scoring": kind.scoring, "events": per_example})
    io_util.atomic_write_bytes(os.path.join(out, "results.md"), md.encode())
    panels = [dict(title=name, ece=r["in_domain"]["ece"], **r["in_domain"]["reliability"])
              for name, r in results.items()]
    plots.reliability_diagram(os.path.join(out, "reliability_in_domain.png"), panels)
    print(f"scoring: {kind.scoring}")
    print(md)
    print(f"results: {os.path.join(out, 'results.json')}; plots: {out}")
  if all(fp is not None for fp in model_fps.values()):
    workspace.mark_done(out, done_fp, models=model_fps)
  return results


STAGE = base.Stage(
    name="evaluate", run=run, is_done=is_done, where=lambda job: job.layout.eval,
    outputs=lambda job: [job.layout.eval], when_done=report)
