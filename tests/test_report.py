"""bench/report.py: events-based ECE, seed means, paired bootstrap intervals, goal check, files.

Synthetic seed records only (no pipeline run, no JAX).
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "report.py")


@pytest.fixture(scope="module")
def report():
  spec = importlib.util.spec_from_file_location("bench_report", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def ref_ece(confidence, correct, num_bins=10):
  """float64 reference: bin m holds float32 confidences in (e_m, e_{m+1}], e_m = float32(m/M)."""
  c32 = np.asarray(confidence, np.float32)
  conf64 = np.asarray(confidence, np.float64)
  corr = np.asarray(correct, np.float64)
  total = 0.0
  for m in range(num_bins):
    lo = -np.inf if m == 0 else np.float32(m / num_bins)
    hi = np.inf if m == num_bins - 1 else np.float32((m + 1) / num_bins)
    mask = (c32 > lo) & (c32 <= hi)
    total += abs(float(np.sum(conf64[mask] - corr[mask])))
  return total / len(conf64)


def _events(rng, n):
  """Rows of one set: over-confident sft; first = same confidences, correctness drawn at the
  confidence (calibrated); sft+ts shrinks sft's confidences; a teacher of its own."""
  conf = np.round(rng.uniform(0.4, 1.0, n), 5)
  # a few values on bin edges (float32 rounding decides their bin)
  conf[:6] = [0.0, 0.3, 0.7, 0.5, 0.9, 1.0][:min(6, n)]
  u = rng.random(n)
  sft = (u < conf - 0.3).astype(int)
  first = (u < conf).astype(int)
  ts_conf = np.round(0.25 + 0.5 * (conf - 0.4), 5)
  t_conf = np.round(rng.uniform(0.3, 1.0, n), 5)
  t_corr = (rng.random(n) < t_conf - 0.1).astype(int)
  ev = {"sft": (conf, sft), "first": (conf, first), "sft+ts": (ts_conf, sft),
        "first+ts": (np.round(0.9 * conf, 5), first), "teacher": (t_conf, t_corr),
        "kd": (conf, (rng.random(n) < conf - 0.1).astype(int))}
  return {r: {"confidence": c.tolist(), "correct": k.tolist()} for r, (c, k) in ev.items()}


def make_record(tag, seed, n_id=400, n_ood=200, ood=("ood:a", "ood:b"), holds=True,
                overrides=None, drop=()):
  rng = np.random.default_rng(seed)
  sets = {"in_domain": n_id, **{o: n_ood for o in ood}}
  per_set = {s: _events(rng, n) for s, n in sets.items()}
  rows = [r for r in per_set["in_domain"] if r not in drop]
  events = {r: {s: per_set[s][r] for s in sets} for r in rows}
  for r, src in (overrides or {}).items():  # row r gets a copy of row src's events
    events[r] = json.loads(json.dumps(events[src]))
  results = {}
  for r, by_set in events.items():
    results[r] = {}
    for s, ev in by_set.items():
      c, k = np.asarray(ev["confidence"]), np.asarray(ev["correct"])
      m = {"n": len(c), "accuracy": float(k.mean()), "confidence": float(c.mean()),
           "ece": ref_ece(c, k), "ece10": ref_ece(c, k), "ece15": ref_ece(c, k, 15),
           "ece10_mass": 0.1, "mce": 0.2, "brier": 0.5, "nll": 1.0, "scoring": "choices",
           "vocab": {"accuracy": 0.3, "ece": 0.05}}
      if r.endswith("+ts"):
        m["temperature"] = 1.5
      results[r][s] = m
  calib = {"scoring": "choices", "mode": "log_space", "temperature": 2.0, "num_events": 123,
           "num_bins": 10,
           "premise": {"teacher_val_confidence": 0.8, "teacher_val_accuracy": 0.6,
                       "teacher_val_ece": 0.2, "t_log_space": 2.0, "t_prob_softmax": 1.3,
                       "tail": "bucket", "holds": holds},
           "searches": {f"{m}-{t}": {"best_t": 2.0, "best_ece": 0.05,
                                     "ece_at_identity": 0.2 if m == "log_space" else None,
                                     "temperatures": [1.0, 2.0], "ece": [0.2, 0.05],
                                     "nll": [1, 1], "brier": [1, 1]}
                        for m in ("prob_softmax", "log_space") for t in ("bucket", "renormalize")},
           "teacher_top1_accuracy": 0.6, "topk_mass_mean": list(np.linspace(0.5, 0.99, 20))}
  return {"run": f"/x/{tag}", "tag": tag, "results": results, "ood": list(ood),
          "scoring": "choices", "in_domain": "task", "events": events, "calibration": calib,
          "store": {"bytes": 1000, "k": 5, "seq_len": 10, "logprob_dtype": "float16",
                    "records": 4},
          "timings": {"train": 10.0 + seed}}


def write_seeds(out, name, records):
  os.makedirs(os.path.join(out, "results"), exist_ok=True)
  for rec in records:
    with open(os.path.join(out, "results", f"{name}_{rec['tag']}.json"), "w") as f:
      json.dump(rec, f, separators=(",", ":"), sort_keys=True)


def test_events_ece_matches_float64_reference(report):
  rng = np.random.default_rng(1)
  conf = np.round(rng.random(3000), 5)
  conf[:8] = [0.0, 0.1, 0.3, 0.6, 0.7, 0.8, 1.0, 0.30000]
  correct = (rng.random(3000) < conf).astype(int)
  assert report.ece(conf, correct) == pytest.approx(ref_ece(conf, correct), abs=1e-12)
  rec = make_record("seed0", 5)
  s = report.aggregate([rec], num_bootstrap=50)
  for r in ("sft", "first", "teacher"):
    ev = rec["events"][r]["in_domain"]
    assert s["rows"][r]["id_ece"][0] == pytest.approx(
        ref_ece(ev["confidence"], ev["correct"]), abs=6e-6)
    ood = np.mean([ref_ece(**rec["events"][r][o]) for o in rec["ood"]])
    assert s["rows"][r]["ood_ece"][0] == pytest.approx(ood, abs=6e-6)


def test_point_estimate_is_mean_over_seeds(report):
  recs = [make_record(f"seed{i}", 10 + i, n_id=300 + 50 * i) for i in range(3)]
  s = report.aggregate(recs, num_bootstrap=100)
  assert s["seeds"] == ["seed0", "seed1", "seed2"]
  for r in ("sft", "kd"):
    id_ece = [ref_ece(**rec["events"][r]["in_domain"]) for rec in recs]
    id_acc = [np.mean(rec["events"][r]["in_domain"]["correct"]) for rec in recs]
    ood_acc = [np.mean([np.mean(rec["events"][r][o]["correct"]) for o in rec["ood"]])
               for rec in recs]
    assert s["rows"][r]["id_ece"][0] == pytest.approx(np.mean(id_ece), abs=6e-6)
    assert s["rows"][r]["id_accuracy"][0] == pytest.approx(np.mean(id_acc), abs=6e-6)
    assert s["rows"][r]["ood_accuracy"][0] == pytest.approx(np.mean(ood_acc), abs=6e-6)
    lo, hi = s["rows"][r]["id_ece"][1:]
    assert lo < s["rows"][r]["id_ece"][0] < hi
  # the seeds differ, so the mean is not any single seed's value
  assert len({round(ref_ece(**rec["events"]["sft"]["in_domain"]), 5) for rec in recs}) == 3


def test_identical_row_gives_exact_zero_difference(report):
  recs = [make_record(f"seed{i}", 20 + i, overrides={"first": "sft"}) for i in range(3)]
  s = report.aggregate(recs, num_bootstrap=200)
  for k in report.KEYS:
    assert s["paired"]["first-sft"][k] == [0.0, 0.0, 0.0]
  assert s["paired"]["first-sft"]["id_ece_relative"] == [0.0, 0.0, 0.0]
  assert s["goal"]["first"]["id_ece_30pct_below_sft"] is False
  assert s["goal"]["first"]["id_accuracy_not_lower_than_sft"] is True  # hi = 0 >= 0
  # but the rows themselves have a proper interval
  lo, hi = s["rows"]["sft"]["id_ece"][1:]
  assert hi - lo > 0.01


def test_clearly_better_row_meets_goal(report):
  recs = [make_record(f"seed{i}", 30 + i) for i in range(2)]
  s = report.aggregate(recs, num_bootstrap=300)
  p = s["paired"]["first-sft"]
  assert p["id_ece"][2] < 0  # interval excludes zero
  assert p["id_ece_relative"][0] <= -0.30
  assert p["id_ece_relative"][2] < 0
  assert p["id_accuracy"][0] > 0
  g = s["goal"]["first"]
  assert g["id_ece_30pct_below_sft"] is True
  assert g["id_accuracy_not_lower_than_sft"] is True
  assert isinstance(g["ood_ece_below_sft_ts"], bool)
  assert g["ood_ece_below_sft_ts"] == (s["paired"]["first-sft+ts"]["ood_ece"][0] < 0)
  assert g["all_met"] == all(g[k] for k in ("id_ece_30pct_below_sft",
                                            "id_accuracy_not_lower_than_sft",
                                            "ood_ece_below_sft_ts"))
  assert set(s["goal"]) == {"first", "first+ts"}


def test_interval_widens_with_fewer_examples(report):
  wide = report.aggregate([make_record("seed0", 40, n_id=80, n_ood=40)], num_bootstrap=300)
  narrow = report.aggregate([make_record("seed0", 40, n_id=2000, n_ood=1000)],
                            num_bootstrap=300)
  for k in ("id_ece", "id_accuracy", "ood_ece"):
    w = wide["rows"]["sft"][k][2] - wide["rows"]["sft"][k][1]
    n = narrow["rows"]["sft"][k][2] - narrow["rows"]["sft"][k][1]
    assert w > 2 * n, (k, w, n)


def test_missing_row_and_premise_and(report):
  recs = [make_record("seed0", 50), make_record("seed1", 51, drop=("kd",), holds=False)]
  s = report.aggregate(recs, num_bootstrap=100)
  assert s["premise"]["holds"] is False
  assert s["_detail"]["n_seeds"]["kd"] == 1
  assert s["rows"]["kd"]["id_ece"][0] == pytest.approx(
      ref_ece(**recs[0]["events"]["kd"]["in_domain"]), abs=6e-6)
  assert "| kd (n=1) |" in report.main_table(s)
  assert list(s["rows"])[:5] == ["teacher", "sft", "sft+ts", "kd", "first"]


def test_aggregate_only_from_files(report, tmp_path):
  out = str(tmp_path / "docs")
  name = "trust"
  recs = [make_record(f"seed{i}", 60 + i) for i in range(2)]
  write_seeds(out, name, recs)
  # files matching the glob that are not this study's seed records
  res = os.path.join(out, "results")
  with open(os.path.join(res, f"{name}_summary.json"), "w") as f:
    json.dump({"config": "x", "seeds": []}, f)
  with open(os.path.join(res, f"{name}_headline.md"), "w") as f:
    f.write("old\n")
  other = make_record("seed0", 99)
  with open(os.path.join(res, f"{name}_long_seed0.json"), "w") as f:
    json.dump(other, f)
  with open(os.path.join(out, f"{name}_reading.md"), "w") as f:
    f.write("## Reading\n\nhand-written text\n")
  summary_path = str(tmp_path / "summary.json")
  report.main(["--aggregate-only", "--name", name, "--out", out, "--summary", summary_path,
               "--bootstrap", "100", "--title", "Trust"])
  with open(summary_path) as f:
    summary = json.load(f)
  assert summary["seeds"] == ["seed0", "seed1"]
  assert summary["bootstrap"] == 100
  with open(os.path.join(out, f"{name}.md")) as f:
    md = f.read()
  assert md.startswith("# Results: Trust\n")
  order = ["## Premise", "## Main table", "## Paired differences", "## Goal check",
           "## Teacher temperature search", "## Secondary metrics", "## Post-hoc temperatures",
           "## Concentrated knowledge", "## Store and wall-clock", "hand-written text"]
  pos = [md.index(h) for h in order]
  assert pos == sorted(pos)
  assert "HOLDS" in md and "no identity; raw teacher 0.2000" in md
  with open(os.path.join(res, f"{name}_headline.md")) as f:
    head = f.read()
  assert head.startswith("| model | ID accuracy | ID ECE | OOD accuracy | OOD ECE |")
  assert "| first | " in head
  # rebuilt from the same files: the same numbers
  again = report.build(out, name, "Trust", num_bootstrap=100)
  assert report.public(again) == summary


def test_summary_has_exactly_the_keys(report):
  s = report.public(report.aggregate([make_record("seed0", 70)], num_bootstrap=50,
                                     config_name="configs/trust.py"))
  assert set(s) == {"config", "seeds", "n", "scoring", "premise", "rows", "paired", "goal",
                    "bootstrap"}
  assert s["config"] == "configs/trust.py"
  assert s["n"] == {"val": 123, "test": 400, "ood_per_task": {"a": 200, "b": 200}}
  assert set(s["premise"]) == {"teacher_val_confidence", "teacher_val_accuracy", "t_log_space",
                               "t_prob_softmax", "holds"}
  assert set(s["paired"]) == {"first-sft", "first-sft+ts", "first+ts-sft+ts", "kd-sft+ts"}
  for v in s["paired"].values():
    assert set(v) == set(report.KEYS) | {"id_ece_relative"}
  for v in s["rows"].values():
    assert set(v) == set(report.KEYS)
    assert all(len(x) == 3 for x in v.values())
  # 5-decimal rounding, valid JSON (no NaN)
  json.loads(json.dumps(s, allow_nan=False))
  assert s["rows"]["sft"]["id_ece"][0] == round(s["rows"]["sft"]["id_ece"][0], 5)


def fake_workdir(tmp_path, tag: str, png: bytes = b"png"):
  rec = make_record(tag, 80)
  wd = tmp_path / "runs" / tag
  (wd / "eval").mkdir(parents=True)
  (wd / "store").mkdir()
  (wd / "eval" / "results.json").write_text(json.dumps(
      {"results": rec["results"], "ood": rec["ood"], "in_domain": "task", "scoring": "choices"}))
  (wd / "eval" / "events.json").write_text(json.dumps({"scoring": "choices",
                                                       "events": rec["events"]}))
  (wd / "eval" / "reliability_in_domain.png").write_bytes(png)
  (wd / "store" / "manifest.json").write_text(json.dumps(
      {"calibration": rec["calibration"], "k": 5, "seq_len": 10, "logprob_dtype": "float16",
       "shards": [{"num_records": 3}, {"num_records": 4}]}))
  (wd / "store" / "a.bin").write_bytes(b"x" * 700)
  (wd / "store" / "b.bin").write_bytes(b"x" * 300)
  (wd / "timings.json").write_text(json.dumps({"train": 3.0}))
  return rec, wd


def test_collect_from_workdir(report, tmp_path):
  rec, wd = fake_workdir(tmp_path, "seed3")
  out = str(tmp_path / "docs")
  report.main(["--runs", str(wd), "--name", "t", "--out", out, "--bootstrap", "20"])
  path = os.path.join(out, "results", "t_seed3.json")
  with open(path) as f:
    text = f.read()
  assert ", " not in text[:200] and ": " not in text[:200]  # compact separators
  got = json.loads(text)
  assert set(got) == {"run", "tag", "results", "ood", "scoring", "in_domain", "events",
                      "calibration", "store", "stores", "timings"}
  assert got["stores"] == {}  # no sampled store in this run
  assert got["tag"] == "seed3" and got["events"] == rec["events"]
  assert got["store"] == {"bytes": 1000, "k": 5, "seq_len": 10, "logprob_dtype": "float16",
                          "records": 7, "positions": 10, "scored_tokens": None}
  assert os.path.exists(os.path.join(out, "results", "figures", "t_reliability_in_domain.png"))
  with open(os.path.join(out, "t.md")) as f:
    assert "![reliability_in_domain](results/figures/t_reliability_in_domain.png)" in f.read()


def test_figures_come_from_the_first_seed_whatever_the_order_of_collection(report, tmp_path):
  out, fig = str(tmp_path / "docs"), tmp_path / "docs" / "results" / "figures"
  for tag in ("seed3", "seed5", "seed1", "seed4"):  # seed1 arrives third
    _, wd = fake_workdir(tmp_path, tag, png=tag.encode())
    report.main(["--runs", str(wd), "--name", "t", "--out", out, "--bootstrap", "20"])
    first = "seed1" if tag in ("seed1", "seed4") else "seed3"
    assert (fig / "t_reliability_in_domain.png").read_bytes() == first.encode(), tag


def test_add_rows_extends_a_committed_record_of_the_same_evaluation(report, tmp_path):
  """--add-rows: a seed re-evaluated with more students adds its new models to the committed
  record; the models both have must agree example by example, or nothing is written."""
  out = str(tmp_path / "docs")
  write_seeds(out, "t", [make_record("seed3", 80, drop=("kd", "first+ts"))])
  rec, wd = fake_workdir(tmp_path, "seed3")
  (wd / "sampled" / "t1").mkdir(parents=True)
  (wd / "sampled" / "t1" / "manifest.json").write_text(json.dumps(
      {"sampling": {"sampler": "priority", "temperature": 1.0}, "k": 10, "record_bytes": 70}))
  (wd / "sampled" / "t1" / "shard.bin").write_bytes(b"x" * 140)
  report.main(["--runs", str(wd), "--name", "t", "--out", out, "--bootstrap", "20",
               "--add-rows"])
  with open(os.path.join(out, "results", "t_seed3.json")) as f:
    got = json.load(f)
  assert got["events"]["kd"] == rec["events"]["kd"] and "first+ts" in got["results"]
  assert got["added_rows"][0]["models"] == ["first+ts", "kd"]
  assert got["added_rows"][0]["stores"]["t1"]["bytes"] == 140
  # another evaluation (other examples): refused with one line, the record left as it was
  write_seeds(out, "u", [make_record("seed3", 81, drop=("kd",))])
  before = open(os.path.join(out, "results", "u_seed3.json")).read()
  with pytest.raises(SystemExit, match="events of first differs"):
    report.main(["--runs", str(wd), "--name", "u", "--out", out, "--add-rows"])
  assert open(os.path.join(out, "results", "u_seed3.json")).read() == before
  with pytest.raises(SystemExit, match="no committed record"):
    report.main(["--runs", str(wd), "--name", "v", "--out", out, "--add-rows"])
