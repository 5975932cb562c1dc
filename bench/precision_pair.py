"""The same seed's run at two precisions, paired example by example (issue 23).

    python -m bench.precision_pair --a docs/results/results_demo_seed0.json \
        --b docs/results/results_demo_float32_seed0.json --a-name bfloat16 --b-name float32 \
        --out docs/results_demo_precision

Both runs are the same job on the same split (the seed fixes the subsample, the split and the
training order), so every evaluated example appears in both: for each model and set (in-domain
test; out-of-domain: the mean over its tasks of each task's value, as bench.report) it reports accuracy and ECE under each precision, the difference
a - b with a 95% paired bootstrap interval (the same resampled examples for both runs), and
whether b's own 95% interval holds a's value. A run is a workdir (bench.report.load_run) or a
committed seed record (docs/results/*_seed*.json). Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from bench import report


def _record(path: str) -> dict:
  if os.path.isdir(path):
    return report.load_run(path)
  with open(path) as f:
    return json.load(f)


def _sets(rec: dict) -> dict[str, list[str]]:
  return {"in-domain": ["in_domain"], "out-of-domain": [f"ood:{o}" if not o.startswith("ood:")
                                                        else o for o in rec["ood"]]}


def _events(rec: dict, model: str, s: str) -> tuple[np.ndarray, np.ndarray]:
  ev = rec["events"][model][s]
  return np.asarray(ev["confidence"], np.float64), np.asarray(ev["correct"], np.float64)


def _stats(sets: list[tuple[np.ndarray, np.ndarray]], idx: list[np.ndarray] | None = None
           ) -> np.ndarray:
  """[accuracy, ECE], each the mean over the sets of the set's own value (bench.report's
  definition of the out-of-domain figures)."""
  vals = []
  for j, (conf, corr) in enumerate(sets):
    if idx is not None:
      conf, corr = conf[idx[j]], corr[idx[j]]
    vals.append([corr.mean(), report.ece(conf, corr)])
  return np.mean(vals, axis=0)


def compare(a: dict, b: dict, num_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
  models = [m for m in a["events"] if m in b["events"]]
  out: dict[str, Any] = {}
  for label, sets in _sets(a).items():
    if sets != _sets(b)[label]:
      raise SystemExit(f"{label}: the runs evaluate different sets ({sets} vs {_sets(b)[label]})")
    for m in models:
      ea = [_events(a, m, s) for s in sets]
      eb = [_events(b, m, s) for s in sets]
      for s, x, y in zip(sets, ea, eb):
        if len(x[0]) != len(y[0]):
          raise SystemExit(f"{m} {s}: {len(x[0])} vs {len(y[0])} examples: not the same split")
      rng = np.random.default_rng(seed)
      reps_a, reps_b = [], []
      for _ in range(num_bootstrap):  # one draw per set, shared by both runs: paired
        idx = [rng.integers(0, len(x[0]), len(x[0])) for x in ea]
        reps_a.append(_stats(ea, idx))
        reps_b.append(_stats(eb, idx))
      ra, rb = np.array(reps_a), np.array(reps_b)
      va, vb = _stats(ea), _stats(eb)
      row: dict[str, Any] = {"n": int(sum(len(x[0]) for x in ea))}
      for j, metric in enumerate(("accuracy", "ece")):
        lo_b, hi_b = report.interval(rb[:, j])
        row[metric] = {"a": float(va[j]), "b": float(vb[j]), "a_minus_b": float(va[j] - vb[j]),
                       "a_minus_b_ci": report.interval(ra[:, j] - rb[:, j]),
                       "b_ci": (lo_b, hi_b), "a_within_b_ci": bool(lo_b <= va[j] <= hi_b)}
      row["same_correctness"] = float(np.mean(np.concatenate(
          [x[1] == y[1] for x, y in zip(ea, eb)])))
      out.setdefault(label, {})[m] = row
  return out


def markdown(res: dict, a_name: str, b_name: str, a_path: str, b_path: str,
             command: str = "python -m bench.precision_pair --a A --b B --out OUT",
             title: str = "The README job") -> str:
  lines = [f"# {title} at {a_name} vs {b_name}: the same seed, paired", "",
           f"a = {a_name}: `{a_path}`; b = {b_name}: `{b_path}`. "
           "Difference a - b with its 95% paired bootstrap interval (2,000 resamples of the "
           "evaluated examples, the same for both runs); 'in b's CI': whether a's value lies in "
           "b's own 95% bootstrap interval. Out-of-domain: the mean over the tasks of each task's "
           "value (bench.report's definition), each task's examples resampled. `same correct`: share of examples whose correctness "
           "is the same in both runs.", "",
           f"Command: `{command}`.", ""]
  for label, rows in res.items():
    lines += [f"## {label}", "",
              f"| model | n | acc {a_name} | acc {b_name} | diff [95% CI] | in b's CI | "
              f"ECE {a_name} | ECE {b_name} | diff [95% CI] | in b's CI | same correct |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
      cells = [m, str(r["n"])]
      for metric in ("accuracy", "ece"):
        x = r[metric]
        lo, hi = x["a_minus_b_ci"]
        cells += [f"{x['a']:.4f}", f"{x['b']:.4f}", f"{x['a_minus_b']:+.4f} [{lo:+.4f}, {hi:+.4f}]",
                  "yes" if x["a_within_b_ci"] else "**no**"]
      cells.append(f"{r['same_correctness']:.3f}")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--a", required=True, help="workdir or seed-record JSON")
  ap.add_argument("--b", required=True, help="workdir or seed-record JSON")
  ap.add_argument("--a-name", default="a")
  ap.add_argument("--b-name", default="b")
  ap.add_argument("--out", required=True, help="<out>.json and <out>.md are written")
  ap.add_argument("--bootstrap", type=int, default=2000)
  ap.add_argument("--title", default="The README job", help="what was run twice (the heading)")
  args = ap.parse_args(argv)
  res = compare(_record(args.a), _record(args.b), args.bootstrap)
  payload = {"a": {"name": args.a_name, "path": args.a}, "b": {"name": args.b_name,
                                                             "path": args.b}, "paired": res}
  report.atomic_write(args.out + ".json", json.dumps(payload, indent=1) + "\n")
  command = (f"python -m bench.precision_pair --a {args.a} --b {args.b} --a-name {args.a_name} "
             f"--b-name {args.b_name} --out {args.out}"
             + (f" --title '{args.title}'" if args.title != "The README job" else ""))
  text = markdown(res, args.a_name, args.b_name, args.a, args.b, command, args.title)
  report.atomic_write(args.out + ".md", text)
  print(text)
  return payload


if __name__ == "__main__":
  main()
