"""Stage 2: "trustworthy maximisation" — the teacher temperature that minimises its ECE.

The fine-tuned teacher's top-k at each validation example's answer position gives one event:
confidence = re-scaled top-1 probability, correct = top-1 id is the gold answer letter.
`temperature.search` scans a grid (then a finer one) in one compiled program, for both scaling
modes; the results, the ECE-vs-temperature curves and the share of probability mass inside the
top-k for k = 1..20 ("concentrated knowledge") go into the store manifest and PNGs.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from first_jax import cli, extract, plots, sharding, store, temperature, workspace

log = logging.getLogger(__name__)
MAX_K_REPORT = 20


def answer_events(top: dict, arrays: dict) -> tuple[np.ndarray, ...]:
  """Top-k at each example's answer position, and the gold letter's token id."""
  rows = np.arange(len(arrays["answer_pos"]))
  pos = arrays["answer_pos"]
  gold = arrays["choice_ids"][rows, arrays["label"]]
  return (top["teacher_logprobs"][rows, pos], top["teacher_ids"][rows, pos],
          top["teacher_tail"][rows, pos], gold)


def run(cfg) -> dict:
  out = workspace.folder(cfg, "store")
  store.StoreReader(out, verify=False)  # a clear error if extract has not written the store
  tok = workspace.tokenizer(cfg)
  data = workspace.load_data(cfg, tok)
  teacher = workspace.load_export(cfg, workspace.folder(cfg, "teacher"), "teacher")
  val = data.splits["validation"]
  k, k_report = cfg.extract.k, max(MAX_K_REPORT, cfg.extract.k)
  fn = extract.topk_fn(teacher.module, k_report, answer_only=True)
  top = extract.run_topk(fn, teacher.params, val, cfg.extract.batch_size,
                         sharding.batch_sharding(workspace.mesh(cfg)), desc="calibrate")
  lp_NxR, ids_NxR, _, gold_N = answer_events(top, val)
  mass_NxR = np.cumsum(np.exp(lp_NxR.astype(np.float64)), axis=-1)
  lp_NxK, ids_NxK = lp_NxR[:, :k], ids_NxR[:, :k]
  tail_N = np.log1p(-np.minimum(mass_NxR[:, k - 1], 1 - 1e-7)).astype(np.float32)
  curves = {}
  for mode in ("prob_softmax", "log_space"):
    res = jax.jit(lambda a, b, c, d, mode=mode: temperature.search(
        a, b, c, mode=mode, num_bins=cfg.calibrate.num_bins, refine=cfg.calibrate.refine,
        tail_logmass_N=d if cfg.distill.tail == "bucket" else None))(
            jnp.asarray(lp_NxK), jnp.asarray(ids_NxK), jnp.asarray(gold_N), jnp.asarray(tail_N))
    res = jax.device_get(res)
    t1 = np.argmin(np.abs(res.temperatures_T - 1.0))
    curves[mode] = {
        "best_t": float(res.best_t), "best_ece": float(res.best_ece),
        "ece_at_t1": float(res.ece_T[t1]) if abs(res.temperatures_T[t1] - 1) < 1e-6 else None,
        "temperatures": res.temperatures_T.tolist(), "ece": res.ece_T.tolist(),
        "nll": res.nll_T.tolist(), "brier": res.brier_T.tolist()}
    plots.temperature_curve(os.path.join(out, f"calibration_{mode}.png"), res.temperatures_T,
                            res.ece_T, float(res.best_t),
                            f"teacher ECE vs temperature ({mode})")
    log.info("calibrate %s: best t=%.4g ECE=%.4f", mode, res.best_t, res.best_ece)
  block = {
      "mode": cfg.calibrate.mode, "temperature": curves[cfg.calibrate.mode]["best_t"],
      "num_events": int(len(gold_N)), "num_bins": cfg.calibrate.num_bins,
      "teacher_top1_accuracy": float(np.mean(ids_NxK[:, 0] == gold_N)), "curves": curves,
      "topk_mass_mean": mass_NxR.mean(axis=0).tolist(),  # k = 1..k_report
  }
  plots.histogram(os.path.join(out, "topk_mass.png"), mass_NxR[:, k - 1], 20,
                  f"teacher probability mass inside the top-{k}",
                  "concentrated knowledge (validation answers)")
  store.update_manifest(out, calibration=block)
  return block


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
