"""How much of each stored distillation target sits on the answer letters (issue 26): at the
answer position of every training example, the summed target probability of the example's
letter tokens, for the top-5 store (T = 1) and each sampled store (T = 1 and FIRST's calibrated
T, the full-vocabulary softmax(logits / T)), and FIRST's own target (the top-5 and its tail bin
at the calibrated T). A sampled store keeps its tokens' exact probabilities, and a letter at
p >= tau is always kept (core/sampled.py), so its share is exact unless a letter fell below tau
(then it is a lower bound). The letters' share is what a choice-scored student learns from; the
rest of a sampled target is spread over the vocabulary.

    python -m bench.target_mass --out docs/results/target_letter_mass.json \
        vader=configs/trust_vader.py:workdir/trust_vader_rows/seed0 \
        evals=configs/trust_evals.py:workdir/trust_evals_rows/seed0
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np


def letter_mass(job, path: str) -> list[dict]:
  from first_jax.data import store
  train = job.data.splits["train"]
  r = store.StoreReader(path, verify=False)
  n = r.num_examples
  rec = r.read(np.arange(n))
  at = (train["loss_mask"][:n] > 0).argmax(1)  # the answer position (one per example)
  rows = np.arange(n)
  ids_NxK = rec["ids_NxLxK"][rows, at]
  p_NxK = np.exp(rec["logprobs_NxLxK"][rows, at].astype(np.float64))
  letters_NxC = np.asarray(train["choice_ids"])[:n]
  on_NxK = (ids_NxK[:, :, None] == letters_NxC[:, None, :]).any(-1)
  sampling = r.manifest.get("sampling")
  row = {"store": path, "k": r.spec.k,
         "temperature": sampling["temperature"] if sampling else 1.0,
         "target": "sampled (full vocabulary)" if sampling else "top-k (+ tail bin)",
         "examples": int(n), **_stats((p_NxK * on_NxK).sum(1))}
  if sampling or not r.calibration:
    return [row]
  # FIRST's own target at its calibrated T: log_space over the top-k and the tail as one bin,
  # q_i ~ p_i^(1/T) (losses.topk_kd's log_space-bucket form)
  t = float(r.calibration["searches"]["log_space-bucket"]["best_t"])
  tail_N = np.exp(rec["tail_logmass_NxL"][rows, at].astype(np.float64))
  w_NxK = p_NxK ** (1 / t)
  share_N = (w_NxK * on_NxK).sum(1) / (w_NxK.sum(1) + tail_N ** (1 / t))
  return [row, {**row, "temperature": t, "target": "top-k (+ tail bin), FIRST's log_space T",
                **_stats(share_N)}]


def _stats(mass_N: np.ndarray) -> dict:
  return {"letter_mass_mean": round(float(mass_N.mean()), 4),
          "letter_mass_median": round(float(np.median(mass_N)), 4),
          "letter_mass_p10": round(float(np.percentile(mass_N, 10)), 4)}


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("studies", nargs="+", help="name=CONFIG:WORKDIR")
  a = ap.parse_args(argv)
  from first_jax import config as config_lib
  from first_jax.engine.job import Job
  from first_jax.runtime import io_util
  out = {"what": __doc__.split("\n\n")[0], "studies": {}}
  for item in a.studies:
    name, _, rest = item.partition("=")
    cfg_path, _, wd = rest.partition(":")
    job = Job(config_lib.load(["--config", cfg_path, f"--config.workdir={wd}"]))
    stores = [job.layout.store] + sorted(glob.glob(os.path.join(wd, "sampled", "*")))
    out["studies"][name] = [row for s in stores for row in letter_mass(job, os.path.relpath(s))]
    for row in out["studies"][name]:
      print(name, row["target"], f"T={row['temperature']:.3f}", "letters hold",
            row["letter_mass_mean"])
  io_util.atomic_write_json(a.out, out)
  return out


if __name__ == "__main__":
  main()
