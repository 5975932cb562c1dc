"""Collects demo runs (one workdir per seed) into docs/results.md, JSON beside it, and figures.

    python bench/report.py --runs workdir/demo_full/seed0 workdir/demo_full/seed1 ... \
        --out docs --title "demo_full (3 seeds)"

Every figure in the report is read from what the runs wrote (eval/results.json, the store
manifest, timings.json); the per-seed JSON is copied to <out>/results/ so the table can be
checked against it. A hand-written reading, if <out>/results_reading.md exists, is appended.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

METRICS = ("accuracy", "ece", "mce", "brier", "nll")
ORDER = ("teacher_pretrained", "teacher", "sft", "sft_ls", "sft+ts", "kd", "kd-renormalize",
         "first", "first-log_space", "first-renormalize", "first-log_space-renormalize", "full_kd")


def load_run(path: str) -> dict:
  with open(os.path.join(path, "eval", "results.json")) as f:
    res = json.load(f)
  with open(os.path.join(path, "store", "manifest.json")) as f:
    manifest = json.load(f)
  timings = {}
  if os.path.exists(os.path.join(path, "timings.json")):
    with open(os.path.join(path, "timings.json")) as f:
      timings = json.load(f)
  size = sum(os.path.getsize(os.path.join(path, "store", n))
             for n in os.listdir(os.path.join(path, "store")) if n.endswith(".bin"))
  return {"results": res["results"], "ood": res["ood"], "calibration": manifest["calibration"],
          "store": {"bytes": size, "k": manifest["k"], "seq_len": manifest["seq_len"],
                    "logprob_dtype": manifest["logprob_dtype"],
                    "records": sum(s["num_records"] for s in manifest["shards"])},
          "timings": timings}


def per_seed(runs: list[dict], model: str, metric: str, where: str) -> np.ndarray:
  vals = []
  for r in runs:
    if model not in r["results"]:  # a variant some runs did not train
      continue
    sets = r["results"][model]
    if where == "in_domain":
      vals.append(sets["in_domain"][metric])
    else:
      vals.append(np.mean([sets[o][metric] for o in r["ood"]]))
  return np.asarray(vals)


def fmt(v: np.ndarray, n_runs: int) -> str:
  s = f"{v.mean():.4f}" if len(v) == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"
  return s if len(v) == n_runs else f"{s} (n={len(v)})"


def table(runs: list[dict]) -> str:
  models = [m for m in ORDER if any(m in r["results"] for r in runs)]
  head = (["model"] + [f"ID {m}" for m in METRICS] + [f"OOD {m}" for m in METRICS])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in models:
    row = [m] + [fmt(per_seed(runs, m, k, "in_domain"), len(runs)) for k in METRICS]
    row += [fmt(per_seed(runs, m, k, "ood"), len(runs)) for k in METRICS]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def headline(runs: list[dict]) -> str:
  """The compact table README shows: accuracy and ECE, in-domain and out-of-domain mean."""
  cols = (("in_domain", "accuracy"), ("in_domain", "ece"), ("ood", "accuracy"), ("ood", "ece"))
  lines = ["| model | ID accuracy | ID ECE | OOD accuracy | OOD ECE |", "|---|---|---|---|---|"]
  for m in ("teacher_pretrained", "teacher", "sft", "sft+ts", "sft_ls", "kd", "first"):
    if all(m in r["results"] for r in runs):
      lines.append(f"| {m} | " + " | ".join(fmt(per_seed(runs, m, k, w), len(runs))
                                            for w, k in cols) + " |")
  return "\n".join(lines)


def verdict(runs: list[dict], first: str = "first", base: str = "sft") -> str:
  """The issue's target: FIRST ECE >= 30% below SFT's, accuracy at most 1 point lower."""
  out = []
  for where, label in (("in_domain", "in-domain"), ("ood", "out-of-domain mean")):
    e_f, e_s = per_seed(runs, first, "ece", where).mean(), per_seed(runs, base, "ece", where).mean()
    a_f = per_seed(runs, first, "accuracy", where).mean()
    a_s = per_seed(runs, base, "accuracy", where).mean()
    cut = 1 - e_f / e_s if e_s > 0 else float("nan")
    ok = cut >= 0.30 and (a_s - a_f) <= 0.01
    out.append(f"- {label}: ECE {e_s:.4f} ({base}) -> {e_f:.4f} ({first}), "
               f"change {-100 * cut:+.1f}% (target <= -30%); accuracy {a_s:.4f} -> {a_f:.4f} "
               f"({100 * (a_f - a_s):+.1f} points; target >= -1.0): "
               f"**{'met' if ok else 'missed'}**")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--runs", nargs="+", required=True)
  ap.add_argument("--out", default="docs")
  ap.add_argument("--title", default="demo")
  ap.add_argument("--name", default="results")
  args = ap.parse_args()
  runs = [load_run(p) for p in args.runs]
  os.makedirs(os.path.join(args.out, "results", "figures"), exist_ok=True)
  for path, run in zip(args.runs, runs):
    tag = os.path.basename(os.path.normpath(path))
    with open(os.path.join(args.out, "results", f"{args.name}_{tag}.json"), "w") as f:
      json.dump(run, f, indent=1, sort_keys=True)
  fig = os.path.join(args.out, "results", "figures")
  src = args.runs[0]
  copies = {"reliability_in_domain.png": os.path.join(src, "eval", "reliability_in_domain.png"),
            "ece_vs_t_prob_softmax.png": os.path.join(src, "store", "calibration_prob_softmax.png"),
            "ece_vs_t_log_space.png": os.path.join(src, "store", "calibration_log_space.png"),
            "topk_mass.png": os.path.join(src, "store", "topk_mass.png")}
  for name, p in copies.items():
    if os.path.exists(p):
      shutil.copy(p, os.path.join(fig, f"{args.name}_{name}"))
  calib = [r["calibration"] for r in runs]
  mass = np.mean([c["topk_mass_mean"] for c in calib], axis=0)
  timings = {k: np.mean([r["timings"].get(k, np.nan) for r in runs]) for k in runs[0]["timings"]}
  st = runs[0]["store"]
  lines = [
      f"# Results: {args.title}", "",
      f"{len(runs)} run(s): {', '.join(args.runs)}. Headline metrics are over the choice letters",
      "(softmax over A-D at the answer position); ECE uses 10 equal-width bins. "
      "Mean ± sample std over seeds.", "",
      "## Table", "", table(runs), "",
      "## Target (FIRST vs the fine-tuned student)", "", verdict(runs), "",
      "## Teacher calibration (trustworthy maximisation)", "",
      "| seed | teacher top-1 acc (val) | mode | best t | ECE at best t | ECE at t=1 (if on the grid) |",
      "|---|---|---|---|---|---|"]
  for path, c in zip(args.runs, calib):
    for mode in ("prob_softmax", "log_space"):
      cur = c["curves"][mode]
      lines.append(f"| {os.path.basename(path)} | {c['teacher_top1_accuracy']:.4f} | {mode} | "
                   f"{cur['best_t']:.4g} | {cur['best_ece']:.4f} | "
                   f"{'-' if cur['ece_at_t1'] is None else format(cur['ece_at_t1'], '.4f')} |")
  lines += [
      "", f"![ECE vs temperature](results/figures/{args.name}_ece_vs_t_prob_softmax.png)",
      f"![ECE vs temperature](results/figures/{args.name}_ece_vs_t_log_space.png)", "",
      "## Concentrated knowledge", "",
      "Mean teacher probability mass inside its top-k at the validation answer positions:", "",
      "| k | " + " | ".join(str(k) for k in (1, 2, 3, 4, 5, 10, 20) if k <= len(mass)) + " |",
      "|---|" + "---|" * len([k for k in (1, 2, 3, 4, 5, 10, 20) if k <= len(mass)]),
      "| mass | " + " | ".join(f"{mass[k - 1]:.4f}" for k in (1, 2, 3, 4, 5, 10, 20)
                             if k <= len(mass)) + " |", "",
      f"![top-k mass](results/figures/{args.name}_topk_mass.png)", "",
      "## Store and wall-clock", "",
      f"Store: {st['records']} records of {st['seq_len']} positions, k={st['k']}, "
      f"{st['logprob_dtype']}: {st['bytes'] / 1e6:.2f} MB "
      f"({st['bytes'] / (st['records'] * st['seq_len']):.2f} B/position).", "",
      "| stage | seconds (mean over runs) |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
  lines += ["", "## Reliability (in-domain, first run)", "",
            f"![reliability](results/figures/{args.name}_reliability_in_domain.png)", ""]
  reading = os.path.join(args.out, f"{args.name}_reading.md")
  if os.path.exists(reading):
    with open(reading) as f:
      lines += [f.read()]
  with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "results", f"{args.name}_headline.md"), "w") as f:
    f.write(headline(runs) + "\n")
  print("\n".join(lines[:12]))


if __name__ == "__main__":
  main()
