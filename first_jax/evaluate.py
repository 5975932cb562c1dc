"""Stage 4: accuracy and calibration of every model, in-domain and out-of-domain.

Each model is scored at each example's answer position (the output head runs there only):
  choice   softmax over the choice letters' log-probs (lm-eval-harness style): accuracy,
           confidence, ECE (10 and 15 bins, equal-width and equal-mass), MCE, Brier, NLL
  vocab    the reference code's way: correct if the full-vocabulary top-1 token is the gold
           letter, confidence = its probability: accuracy, ECE (10 bins)
Rows: the pre-trained and fine-tuned teacher, every trained student variant, and `sft+ts` (the
SFT student with post-hoc temperature scaling fitted on the validation split). Writes
eval/results.json, eval/results.md and reliability diagrams.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from first_jax import calibration, cli, data as data_lib, io_util, log as log_lib, plots
from first_jax import models, sharding, step, temperature, trainer, workspace

log = logging.getLogger(__name__)
HEADLINE = ("accuracy", "ece", "mce", "brier", "nll")


def scorer(model):
  """The jitted answer-position scoring of `model` (one per model, reused for every set)."""
  return jax.jit(functools.partial(step.answer_scores, apply=trainer.model_apply(model.module)))


def score(fn, model, arrays: dict, batch_size: int, batch_sharding) -> dict[str, np.ndarray]:
  """Answer-position scores of `model` on every row of `arrays`."""
  n = len(arrays["input_ids"])
  keys = ("input_ids", "attention_mask", "answer_pos", "choice_ids")
  batches = data_lib.BatchIterator(arrays, batch_size, seed=0, shuffle=False,
                                   drop_remainder=False, num_epochs=1)
  outs = [jax.device_get(fn(model.params, jax.device_put({k: b[k] for k in keys}, batch_sharding)))
          for b in log_lib.progress(batches, desc="score", total=-(-n // batch_size))]
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def metrics(scores: dict, arrays: dict, num_bins: tuple[int, ...], t: float = 1.0) -> dict:
  """Calibration metrics of one model on one set (`t`: post-hoc temperature on choices)."""
  label_N = jnp.asarray(arrays["label"])
  choice_NxC = jnp.asarray(scores["choice_logprobs"]) / t
  lp_NxC = jax.nn.log_softmax(choice_NxC, axis=-1)
  p_NxC = jnp.exp(lp_NxC)
  conf_N = jnp.max(p_NxC, axis=-1)
  correct_N = (jnp.argmax(p_NxC, axis=-1) == label_N).astype(jnp.float32)
  out: dict[str, Any] = {
      "n": int(len(label_N)), "accuracy": float(correct_N.mean()),
      "confidence": float(conf_N.mean()), "brier": float(calibration.brier(p_NxC, label_N)),
      "nll": float(calibration.nll(lp_NxC, label_N))}
  for nb in num_bins:
    for binning, tag in (("equal_width", ""), ("equal_mass", "_mass")):
      out[f"ece{nb}{tag}"] = float(calibration.ece(conf_N, correct_N, nb, binning))
  out["ece"] = out[f"ece{num_bins[0]}"]
  out["mce"] = float(calibration.mce(conf_N, correct_N, num_bins[0]))
  rel = calibration.reliability(conf_N, correct_N, num_bins[0])
  out["reliability"] = {"count": np.asarray(rel.count_M).tolist(),
                        "confidence": np.asarray(rel.confidence_M).tolist(),
                        "accuracy": np.asarray(rel.accuracy_M).tolist()}
  gold_N = np.asarray(arrays["choice_ids"])[np.arange(len(label_N)), arrays["label"]]
  v_correct = (scores["top1_id"] == gold_N).astype(np.float32)
  v_conf = np.exp(scores["top1_logprob"])
  out["vocab_accuracy"] = float(v_correct.mean())
  out["vocab_confidence"] = float(v_conf.mean())
  out["vocab_ece"] = float(calibration.ece(jnp.asarray(v_conf), jnp.asarray(v_correct),
                                           num_bins[0]))
  return out


def _models(cfg, tok) -> dict[str, Any]:
  """Name -> loader of every model the workdir holds."""
  found = {"teacher_pretrained": lambda: workspace.init_model(cfg, "teacher", tok)}
  if os.path.exists(workspace.folder(cfg, "teacher", "export", "config.json")):
    found["teacher"] = functools.partial(workspace.load_export, cfg,
                                         workspace.folder(cfg, "teacher"), "teacher")
  for name in cfg.students:
    path = workspace.folder(cfg, "students", name)
    if os.path.exists(os.path.join(path, "export", "config.json")):
      found[name] = functools.partial(workspace.load_export, cfg, path)
  for path in cfg.evaluate.models:
    found[os.path.basename(os.path.normpath(path))] = functools.partial(
        models.load_pretrained, path, mesh=workspace.mesh(cfg))
  return found


def table(results: dict, in_domain: str, ood: list[str]) -> str:
  """Markdown: headline metrics in-domain and the mean over out-of-domain sets."""
  head = ["model"] + [f"ID {m}" for m in HEADLINE] + ([f"OOD {m}" for m in HEADLINE] if ood
                                                         else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, sets in results.items():
    row = [name] + [f"{sets[in_domain][m]:.4f}" for m in HEADLINE]
    if ood:
      row += [f"{np.mean([sets[o][m] for o in ood]):.4f}" for m in HEADLINE]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def run(cfg) -> dict:
  out = workspace.folder(cfg, "eval")
  tok = workspace.tokenizer(cfg)
  data = workspace.load_data(cfg, tok)
  sets = {"in_domain": data.splits["test"], **{f"ood:{k}": v for k, v in data.ood.items()}}
  bs = sharding.batch_sharding(workspace.mesh(cfg))
  nb = tuple(cfg.evaluate.num_bins)
  results: dict[str, dict] = {}
  for name, load in _models(cfg, tok).items():
    model = load()
    fn = scorer(model)
    scored = {s: score(fn, model, arrays, cfg.evaluate.batch_size, bs)
              for s, arrays in sets.items()}
    results[name] = {s: metrics(scored[s], sets[s], nb) for s in sets}
    log.info("evaluate %s: ID accuracy %.4f ECE %.4f", name,
             results[name]["in_domain"]["accuracy"], results[name]["in_domain"]["ece"])
    if name == "sft":  # the reviewer's baseline: SFT + post-hoc temperature scaling
      val = score(fn, model, data.splits["validation"], cfg.evaluate.batch_size, bs)
      fit = temperature.fit_nll_temperature_logits(
          jnp.asarray(val["choice_logprobs"]), jnp.asarray(data.splits["validation"]["label"]))
      t = float(fit.t)
      results["sft+ts"] = {s: {**metrics(scored[s], sets[s], nb, t=t), "temperature": t}
                           for s in sets}
  ood = [s for s in sets if s != "in_domain"]
  md = table(results, "in_domain", ood)
  io_util.atomic_write_json(os.path.join(out, "results.json"),
                            {"results": results, "in_domain": cfg.data.task or cfg.data.source,
                             "ood": ood})
  io_util.atomic_write_bytes(os.path.join(out, "results.md"), md.encode())
  panels = [dict(title=name, ece=r["in_domain"]["ece"], **r["in_domain"]["reliability"])
            for name, r in results.items()]
  plots.reliability_diagram(os.path.join(out, "reliability_in_domain.png"), panels)
  print(md)
  print(f"results: {os.path.join(out, 'results.json')}; plots: {out}")
  return results


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
