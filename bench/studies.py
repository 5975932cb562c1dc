"""The trust studies side by side: one table from each study's summary JSON (bench/report.py).

    python -m bench.studies [--out docs/results_studies.md]

A column per study, every figure read from its committed summary (mean over the student seeds
[95% two-level bootstrap interval]): what the study is (task, sizes, seeds, precision), the
premise FIRST needs (teacher validation confidence vs accuracy, the searched log_space t), the
teacher-student accuracy gap, ID and OOD ECE of SFT, SFT + post-hoc temperature scaling and
FIRST, and FIRST's paired differences from both: "wins" where the interval lies below zero,
"loses" above, "ties" where it holds zero.
"""
from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, summary, what it is, precision, reproducible from the registry)
STUDIES = (
    ("multiemo", "docs/results/summary.json",
     "BIG-bench multiemo hotel sentences, 4-way sentiment", "float32", False),
    ("vader", "docs/results/vader/summary.json",
     "VADER tweets, 3-way sentiment (embedded data)", "bfloat16", True),
    ("evals", "docs/results/evals/summary.json",
     "QuaRTz, 2-way science reasoning (evals registry)", "bfloat16", True),
)


def _ci(v, digits: int = 3) -> str:
  if v is None or v[0] is None:
    return "-"
  mean, lo, hi = v
  return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _val(v, digits: int = 3) -> str:
  return "-" if v is None or v[0] is None else f"{v[0]:.{digits}f}"


def verdict(v) -> str:
  """FIRST minus a baseline (lower is better): its interval below zero wins, above loses."""
  if v is None or v[1] is None:
    return "-"
  return "wins" if v[2] < 0 else "loses" if v[1] > 0 else "ties"


def row(name: str, s: dict, what: str, precision: str, reproducible: bool) -> dict:
  r, p, prem = s["rows"], s["paired"], s["premise"]
  teacher = r.get("teacher", {}).get("id_accuracy")
  sft = r["sft"]["id_accuracy"]
  return {
      "study": name + ("" if reproducible else " (not reproducible from the registry)"),
      "what": what, "precision": precision, "seeds": len(s["seeds"]),
      "sizes": f"test {s['n']['test']}, val {s['n']['val']}, OOD "
               f"{len(s['n']['ood_per_task'])} x {max(s['n']['ood_per_task'].values())}",
      "premise": f"{prem['teacher_val_confidence']:.3f} vs {prem['teacher_val_accuracy']:.3f}, "
                 f"t = {prem['t_log_space']:.2f}" + ("" if prem["holds"] else " (fails)"),
      # the fine-tuned teacher's test accuracy; a study whose seeds restored the teacher's store
      # instead of fine-tuning it has no teacher row: then its validation accuracy, marked
      "gap": (f"{teacher[0] - sft[0]:+.3f}" if teacher is not None else
              f"{prem['teacher_val_accuracy'] - sft[0]:+.3f} (teacher on validation)"),
      "id_ece": " / ".join(_val(r[m]["id_ece"]) for m in ("sft", "sft+ts", "first")),
      "ood_ece": " / ".join(_val(r[m]["ood_ece"]) for m in ("sft", "sft+ts", "first")),
      "first_sft_id": f"{_ci(p['first-sft']['id_ece'])} {verdict(p['first-sft']['id_ece'])}",
      "first_sft_ood": f"{_ci(p['first-sft']['ood_ece'])} {verdict(p['first-sft']['ood_ece'])}",
      "first_ts_id": f"{_ci(p['first-sft+ts']['id_ece'])} "
                     f"{verdict(p['first-sft+ts']['id_ece'])}",
      "first_ts_ood": f"{_ci(p['first-sft+ts']['ood_ece'])} "
                      f"{verdict(p['first-sft+ts']['ood_ece'])}",
      "acc": _ci(p["first-sft"]["id_accuracy"]),
  }


COLUMNS = (("study", "study"), ("what", "task"), ("sizes", "sizes"), ("seeds", "student seeds"),
           ("precision", "matmuls"),
           ("premise", "teacher val confidence vs accuracy, searched t"),
           ("gap", "teacher - SFT ID accuracy"),
           ("id_ece", "ID ECE: SFT / SFT+TS / FIRST"), ("ood_ece", "OOD ECE: SFT / SFT+TS / FIRST"),
           ("acc", "FIRST - SFT ID accuracy"),
           ("first_sft_id", "FIRST - SFT ID ECE"), ("first_sft_ood", "FIRST - SFT OOD ECE"),
           ("first_ts_id", "FIRST - SFT+TS ID ECE"), ("first_ts_ood", "FIRST - SFT+TS OOD ECE"))


def table(rows: list[dict]) -> str:
  """One column per study, one line per figure."""
  lines = ["| | " + " | ".join(r["study"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
  lines += [f"| {head} | " + " | ".join(str(r[key]) for r in rows) + " |"
            for key, head in COLUMNS[1:]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results_studies.md"))
  args = ap.parse_args(argv)
  rows, missing = [], []
  for name, path, what, precision, reproducible in STUDIES:
    full = os.path.join(ROOT, path)
    if not os.path.exists(full):
      missing.append(f"{name} ({path}: not run yet)")
      continue
    with open(full) as f:
      rows.append(row(name, json.load(f), what, precision, reproducible))
  text = ("# The trust studies side by side\n\nGenerated by `python -m bench.studies` from each "
          "study's summary JSON (mean over student seeds [95% two-level bootstrap interval]; "
          "ECE with 10 equal-width bins, confidence = the softmax over the answer letters; OOD = "
          "the mean over the out-of-domain tasks).\n\n" + table(rows))
  if missing:
    text += "\nNot in the table: " + "; ".join(missing) + ".\n"
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, args.out)
  print(text)
  return text


if __name__ == "__main__":
  main()
