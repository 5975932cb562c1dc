"""bench/precision_pair.py: the same seed's run at two precisions, paired per example."""
import json

import numpy as np
import pytest

from bench import precision_pair, report


def _record(rng, flip=0.0, ood=("x", "y")):
  def events(n):
    conf = rng.uniform(0.3, 1.0, n)
    correct = (rng.uniform(size=n) < conf).astype(float)
    return {"confidence": conf.tolist(), "correct": correct.tolist()}
  rec = {"ood": list(ood), "events": {"m": {"in_domain": events(200),
                                            **{f"ood:{o}": events(50 + 10 * i)
                                               for i, o in enumerate(ood)}}}}
  return rec


def _flipped(rec, share, rng):
  out = json.loads(json.dumps(rec))
  for ev in out["events"]["m"].values():
    c = np.asarray(ev["correct"])
    wrong = np.flatnonzero(c == 0)
    c[rng.choice(wrong, int(share * len(wrong)), replace=False)] = 1.0
    ev["correct"] = c.tolist()
  return out


def test_identical_runs_differ_by_nothing():
  rng = np.random.default_rng(0)
  rec = _record(rng)
  res = precision_pair.compare(rec, rec, num_bootstrap=200)
  for label in ("in-domain", "out-of-domain"):
    r = res[label]["m"]
    assert r["accuracy"]["a_minus_b"] == 0 and r["accuracy"]["a_minus_b_ci"] == (0.0, 0.0)
    assert r["same_correctness"] == 1.0 and r["ece"]["a_minus_b_ci"] == (0.0, 0.0)


def test_a_real_difference_is_found_and_ood_is_the_mean_over_tasks():
  rng = np.random.default_rng(1)
  b = _record(rng)
  a = _flipped(b, 0.5, rng)  # half the wrong answers made right: accuracy clearly up
  res = precision_pair.compare(a, b, num_bootstrap=500)
  acc = res["in-domain"]["m"]["accuracy"]
  assert acc["a_minus_b"] > 0 and acc["a_minus_b_ci"][0] > 0 and not acc["a_within_b_ci"]
  ev = b["events"]["m"]
  want = np.mean([report.ece(ev[f"ood:{o}"]["confidence"], ev[f"ood:{o}"]["correct"])
                  for o in b["ood"]])
  assert res["out-of-domain"]["m"]["ece"]["b"] == pytest.approx(want)
  assert res["out-of-domain"]["m"]["n"] == 50 + 60


def test_different_splits_are_refused():
  rng = np.random.default_rng(2)
  a, b = _record(rng), _record(rng)
  b["events"]["m"]["in_domain"]["confidence"].pop()
  b["events"]["m"]["in_domain"]["correct"].pop()
  with pytest.raises(SystemExit, match="not the same split"):
    precision_pair.compare(a, b, num_bootstrap=10)
