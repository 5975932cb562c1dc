"""QuaRTz's twin questions and the students' below-chance accuracy (issue 25's QuaRTz study).

    python -m bench.quartz_twins [--out docs/results/evals/twins.json]

QuaRTz writes most questions twice with the answer flipped ("Eric adds MORE resistors... the
resistance: increases" / "FEWER ... decreases"). A random split puts twins on both sides, so a
student that memorises a training question answers its test twin wrongly. For each test
question of the committed split (data/split.json of the study's workdir, or
docs/results/evals/split.json), the training question with the same two options and the most
similar stem (word Jaccard >= 0.5) is its twin; accuracy per model is then reported over test
questions with a flipped-answer twin in training, with a same-answer twin, and with none, from
the committed per-seed records (their per-example events are in test-split order).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JACCARD = 0.5


def _parse(row: dict) -> tuple[set, frozenset, str]:
  stem, _, opts = row["input"][-1]["content"].partition("\n\n")
  options = dict(re.findall(r"([A-D]): (.*)", opts))
  return set(re.findall(r"[a-z]+", stem.lower())), frozenset(options.values()), options.get(
      row["ideal"])


def twin_kinds(rows: list[dict], train: list[int], test: list[int]) -> np.ndarray:
  """Per test question: "flipped", "same" (the twin's answer) or "none"."""
  parsed = [_parse(r) for r in rows]
  by_options: dict[frozenset, list] = {}
  for i in train:
    by_options.setdefault(parsed[i][1], []).append(parsed[i])
  kinds = []
  for i in test:
    words, options, answer = parsed[i]
    best, twin = 0.0, None
    for w, _, a in by_options.get(options, []):
      j = len(words & w) / max(1, len(words | w))
      if j > best:
        best, twin = j, a
    kinds.append("none" if best < JACCARD else "flipped" if twin != answer else "same")
  return np.array(kinds)


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--split", default=os.path.join(ROOT, "docs", "results", "evals",
                                                  "split.json"))
  ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "evals", "twins.json"))
  args = ap.parse_args(argv)
  from first_jax.data import assets
  with open(assets.evals_file("quartz/samples.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(args.split) as f:
    splits = json.load(f)["splits"]
  kinds = twin_kinds(rows, splits["train"]["indices"], splits["test"]["indices"])
  out = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "jaccard": JACCARD,
         "test_questions": {k: int((kinds == k).sum()) for k in ("flipped", "same", "none")},
         "accuracy": {}}
  for rec_path in sorted(glob.glob(os.path.join(ROOT, "docs", "results",
                                                "results_evals_seed*.json"))):
    with open(rec_path) as f:
      rec = json.load(f)
    for model, sets in sorted(rec["events"].items()):
      correct = np.asarray(sets["in_domain"]["correct"], float)
      if len(correct) != len(kinds):
        raise SystemExit(f"{rec_path}: {len(correct)} test events, the split has {len(kinds)}")
      out["accuracy"].setdefault(model, {})[rec["tag"]] = {
          "all": round(float(correct.mean()), 4),
          **{k: round(float(correct[kinds == k].mean()), 4) for k in ("flipped", "same", "none")}}
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
  os.replace(tmp, args.out)
  print(json.dumps(out["test_questions"]))
  for model, by_seed in out["accuracy"].items():
    print(model, json.dumps(by_seed))
  return out


if __name__ == "__main__":
  main()
