"""The trust study's report: per-seed JSON, bootstrap intervals, paired differences, goal check.

Collect the runs (one workdir per student seed) and rebuild the report from every seed record:

    python bench/report.py --runs workdir/trust/seed0 workdir/trust/seed1 ... \
        --name results --title "trust study" [--out docs] [--summary docs/results/summary.json] \
        [--bootstrap 2000] [--reading docs/results_reading.md] [--config-name configs/trust.py]

Rebuild it from the committed seed records alone (no workdirs):

    python bench/report.py --aggregate-only --name results [--out docs] [--summary PATH] ...

Step 1 (collect, skipped by --aggregate-only) writes, for each workdir WD,
<out>/results/<name>_<basename(WD)>.json: its eval/results.json, its per-example events
(eval/events.json), the store manifest's calibration block, the store's size and shape and
timings.json. The figures of the first run are copied to <out>/results/figures/<name>_*.png.

Step 2 (aggregate) reads every seed record <out>/results/<name>_<tag>.json present (seeds
collected by earlier sessions count too) and writes <out>/<name>.md, the compact table
<out>/results/<name>_headline.md and, with --summary, a machine-readable summary JSON.

Headline metrics (accuracy, ECE with 10 equal-width bins as first_jax.core.calibration.ece) are
recomputed from the events. The point estimate is the mean over seeds; the 95% interval is a
two-level bootstrap (resample the seeds, then the examples within each seed and set, with one
index draw shared by every row so that differences between rows are paired). The goal check
compares FIRST with SFT and with SFT + post-hoc temperature scaling.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from first_jax.core import calibration

ORDER = ("teacher_pretrained", "teacher", "sft", "sft+ts", "sft@val", "sft_ls", "sft_ls-choices",
         "kd", "first", "first+ts", "kd-sampled", "first-sampled", "full_kd")
KEYS = ("id_accuracy", "id_ece", "ood_accuracy", "ood_ece")
NUM_BINS = 10
TOPK = (1, 2, 3, 4, 5, 10, 20)
# (rows compared, paired-differences key); the summary keeps SUMMARY_PAIRS: every distillation row
# against post-hoc scaling (does any beat SFT+TS?), the rows of issue 26 (sampled targets, full KD)
# against FIRST too.
PAIRS = (("first", "sft"), ("first", "sft+ts"), ("first+ts", "sft"), ("first+ts", "sft+ts"),
         ("kd", "sft+ts"), ("kd-sampled", "kd"), ("kd-sampled", "sft+ts"), ("kd-sampled", "first"),
         ("first-sampled", "sft+ts"), ("first-sampled", "first"), ("full_kd", "sft+ts"),
         ("full_kd", "first"), ("full_kd", "kd"))
SUMMARY_PAIRS = ("first-sft", "first-sft+ts", "first+ts-sft+ts", "kd-sft+ts",
                 "first-sampled-sft+ts", "first-sampled-first", "kd-sampled-kd", "kd-sampled-sft+ts",
                 "full_kd-sft+ts", "full_kd-first", "full_kd-kd")
FIGURES = {"reliability_in_domain": ("eval", "reliability_in_domain.png"),
           "calibration_prob_softmax": ("store", "calibration_prob_softmax.png"),
           "calibration_log_space": ("store", "calibration_log_space.png"),
           "topk_mass": ("store", "topk_mass.png")}
SCORING_TEXT = {"tokens": "every response token is an event (text data): confidence = the model's "
                          "top-1 next-token probability, correct = the top-1 is the next token "
                          "(bootstrap over tokens)",
                "choices": "confidence = probability of the most likely answer letter, softmax "
                           "over the letters",
                "vocab": "confidence = full-vocabulary top-1 probability, correct = the top-1 "
                         "token is the gold letter (full-vocabulary top-1)"}


# ----------------------------------------------------------------------------- collect

def atomic_write(path: str, text: str) -> None:
  """Write text to path through a temporary file in the same folder and os.replace."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a regenerated doc is world-readable
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def load_run(path: str) -> dict:
  """The seed record of one run workdir (see the module docstring)."""
  res = _read_json(os.path.join(path, "eval", "results.json"))
  ev = _read_json(os.path.join(path, "eval", "events.json"))
  manifest = _read_json(os.path.join(path, "store", "manifest.json"))
  tpath = os.path.join(path, "timings.json")
  timings = _read_json(tpath) if os.path.exists(tpath) else {}
  sdir = os.path.join(path, "store")
  size = sum(os.path.getsize(os.path.join(sdir, n)) for n in os.listdir(sdir)
             if n.endswith(".bin"))
  tag = os.path.basename(os.path.normpath(path))
  return {"run": path, "tag": tag, "results": res["results"], "ood": res["ood"],
          "scoring": res.get("scoring", ev.get("scoring")), "in_domain": res.get("in_domain"),
          "events": ev["events"], "calibration": manifest["calibration"],
          "store": {"bytes": size, "k": manifest["k"], "seq_len": manifest["seq_len"],
                    "positions": manifest.get("positions", manifest["seq_len"]),
                    "scored_tokens": manifest.get("scored_tokens"),
                    "logprob_dtype": manifest["logprob_dtype"],
                    "records": sum(s["num_records"] for s in manifest["shards"])},
          "stores": _sampled_stores(path), "timings": timings}


def _sampled_stores(path: str) -> dict:
  """The run's sampled stores (sample stage), by folder name: sampling block, k, bytes."""
  out = {}
  for m_path in sorted(glob.glob(os.path.join(path, "sampled", "*", "manifest.json"))):
    folder = os.path.dirname(m_path)
    m = _read_json(m_path)
    out[os.path.basename(folder)] = {
        "sampling": m.get("sampling"), "k": m["k"], "record_bytes": m["record_bytes"],
        "bytes": sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                     if n.endswith(".bin"))}
  return out


def add_rows(old: dict, new: dict) -> dict:
  """`old` seed record with the models of `new` it lacks: the same seed re-evaluated with more
  students (e.g. the sampled rows of issue 26 beside committed ones). Both must be the same
  evaluation (sets, scoring, the teacher's calibration), and a model in both must have the same
  per-example events (checked on every shared model: the pre-trained teacher, whose scores are
  restored from the teacher bundle, at least). Stops with one line otherwise."""
  def same(key, a, b):
    if a != b:
      raise SystemExit(f"--add-rows {new['tag']}: {key} differs from the committed record "
                       f"(not the same evaluation)")
  for key in ("in_domain", "ood", "scoring", "tag"):
    same(key, old.get(key), new.get(key))
  same("calibration temperatures", old["calibration"].get("searches"),
       new["calibration"].get("searches"))
  shared = set(old["events"]) & set(new["events"])
  if not shared:
    raise SystemExit(f"--add-rows {new['tag']}: no model in common to check the examples "
                     f"against (evaluate teacher_pretrained in both)")
  for model in sorted(shared):
    same(f"events of {model}", old["events"][model], new["events"][model])
  out = json.loads(json.dumps(old))
  added = sorted(set(new["events"]) - shared)
  for model in added:
    out["events"][model] = new["events"][model]
    out["results"][model] = new["results"][model]
  out.setdefault("added_rows", []).append(
      {"run": new["run"], "models": added, "timings": new.get("timings", {}),
       "stores": new.get("stores", {})})
  return out


def collect(runs: list[str], out: str, name: str, add: bool = False) -> list[str]:
  """Step 1: one seed record per workdir; the figures of the first seed (the first record by
  file name), copied when that seed is among `runs`. With `add`, each workdir's new models are
  added to its committed record (`add_rows`) instead. Returns the paths written."""
  written, tag_of = [], {}
  tags = [os.path.basename(os.path.normpath(p)) for p in runs]
  if len(set(tags)) != len(tags):
    raise SystemExit(f"--runs: workdir basenames must differ (they name the seed files): {tags}")
  for path in runs:
    rec = load_run(path)
    dst = os.path.join(out, "results", f"{name}_{rec['tag']}.json")
    if add:
      if not os.path.exists(dst):
        raise SystemExit(f"--add-rows: no committed record {dst} to add {path}'s models to")
      atomic_write(dst, json.dumps(add_rows(_read_json(dst), rec), separators=(",", ":"),
                                   sort_keys=True))
      written.append(dst)
      continue
    atomic_write(dst, json.dumps(rec, separators=(",", ":"), sort_keys=True))
    written.append(dst)
    tag_of[rec["tag"]] = path
  first = load_seeds(out, name)[0]["tag"]
  if first in tag_of:
    fig = os.path.join(out, "results", "figures")
    os.makedirs(fig, exist_ok=True)
    for figure, (sub, base) in FIGURES.items():
      src = os.path.join(tag_of[first], sub, base)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(fig, f"{name}_{figure}.png"))
  return written


def load_seeds(out: str, name: str) -> list[dict]:
  """Every seed record <out>/results/<name>_<tag>.json (sorted by file name).

  Files of that pattern that are not seed records (another study whose name extends this one,
  the summary, records of an older format without events) are skipped.
  """
  seeds = []
  for path in sorted(glob.glob(os.path.join(out, "results", f"{name}_*.json"))):
    try:
      rec = _read_json(path)
    except (OSError, ValueError):
      continue
    if not isinstance(rec, dict) or not all(k in rec for k in ("tag", "results", "events")):
      continue
    if os.path.basename(path) != f"{name}_{rec['tag']}.json":
      continue
    seeds.append(rec)
  return seeds


# ----------------------------------------------------------------------------- metrics

def bin_index(confidence, num_bins: int = NUM_BINS) -> np.ndarray:
  """Equal-width bin of each confidence: the evaluation's own (`calibration.bin_index`)."""
  return np.asarray(calibration.bin_index(np.asarray(confidence, np.float32), num_bins))


def ece(confidence, correct, num_bins: int = NUM_BINS) -> float:
  """Expected calibration error over `bin_index`'s bins: sum over bins |sum(conf - correct)| / n,
  summed in float64 (the form the bootstrap's weighted sums take, see `set_columns`)."""
  conf = np.asarray(confidence, np.float64)
  diff = conf - np.asarray(correct, np.float64)
  sums = np.bincount(bin_index(conf, num_bins), weights=diff, minlength=num_bins)
  return float(np.abs(sums).sum() / max(len(conf), 1))


def set_columns(events: dict, rows: list[str], num_bins: int = NUM_BINS) -> np.ndarray:
  """n x R*(M+1) matrix: per row, (conf - correct) one-hot in its bin (M columns), correct.

  A weight vector w over the examples (multinomial counts) gives, by w @ D, every row's
  per-bin sums and number correct at once.
  """
  n = len(events[rows[0]]["correct"])
  d = np.zeros((n, len(rows) * (num_bins + 1)))
  for i, r in enumerate(rows):
    conf = np.asarray(events[r]["confidence"], np.float64)
    corr = np.asarray(events[r]["correct"], np.float64)
    if len(conf) != n or len(corr) != n:
      raise ValueError(f"events of {r!r}: {len(conf)} examples, expected {n}")
    base = i * (num_bins + 1)
    d[np.arange(n), base + bin_index(conf, num_bins)] = conf - corr
    d[:, base + num_bins] = corr
  return d


def metrics_from_sums(s: np.ndarray, n: int, num_rows: int,
                      num_bins: int = NUM_BINS) -> tuple[np.ndarray, np.ndarray]:
  """(accuracy, ECE), each L x R, from the L x R*(M+1) sums of `set_columns`."""
  s = s.reshape(s.shape[0], num_rows, num_bins + 1)
  return s[:, :, num_bins] / n, np.abs(s[:, :, :num_bins]).sum(-1) / n


def resample_weights(rng: np.random.Generator, num: int, n: int) -> np.ndarray:
  """num x n counts: each row is one with-replacement draw of n indices out of n."""
  idx = rng.integers(0, n, size=(num, n))
  idx += (np.arange(num) * n)[:, None]
  return np.bincount(idx.ravel(), minlength=num * n).reshape(num, n).astype(np.float64)


def seed_values(rec: dict, rows: list[str], weights=None) -> np.ndarray:
  """L x R x 4 (KEYS order) values of one seed; weights: {set: L x n} or None (the data as is).

  A row the seed lacks is NaN. OOD values are the mean over the seed's OOD sets.
  """
  have = [r for r in rows if r in rec["events"]]
  col = {r: rows.index(r) for r in have}
  sets = ["in_domain"] + list(rec.get("ood", []))
  num = 1 if weights is None else next(iter(weights.values())).shape[0]
  out = np.full((num, len(rows), 4), np.nan)
  if not have:
    return out
  per_set = {}
  for s in sets:
    ev = {r: rec["events"][r][s] for r in have}
    d = set_columns(ev, have)
    n = d.shape[0]
    w = np.ones((1, n)) if weights is None else weights[s]
    per_set[s] = metrics_from_sums(w @ d, n, len(have))
  idx = [col[r] for r in have]
  acc, e = per_set["in_domain"]
  out[:, idx, 0], out[:, idx, 1] = acc, e
  ood = [s for s in sets if s != "in_domain"]
  if ood:
    out[:, idx, 2] = np.mean([per_set[s][0] for s in ood], axis=0)
    out[:, idx, 3] = np.mean([per_set[s][1] for s in ood], axis=0)
  return out


def order_rows(seeds: list[dict]) -> list[str]:
  found = set().union(*(set(s["events"]) for s in seeds))
  return [r for r in ORDER if r in found] + sorted(found - set(ORDER))


def bootstrap_values(seeds: list[dict], rows: list[str], pairs: list[tuple[str, str]],
                     num: int, seed: int = 0,
                     chunk_elems: int = 4_000_000) -> dict[str, np.ndarray]:
  """Two-level bootstrap replicates of the row values, paired differences and ratios.

  Replicate j draws S seeds with replacement (when S > 1; else the one seed); each drawn seed
  (a slot) draws its own examples of every set with replacement, one index draw shared by all
  rows of that seed and set. A replicate's value is the mean over its slots that have the
  row(s). Returns {"rows": B x R x 4, "pairs": B x P x 4 (a - b), "ratio": B x P (ID ECE a / b
  - 1, the ratio of the replicate means)}; NaN where no slot qualifies.
  """
  rng = np.random.default_rng(seed)
  S, R, P = len(seeds), len(rows), len(pairs)
  if S > 1:
    slots = rng.integers(0, S, size=(num, S))
    counts = np.stack([np.bincount(slots[j], minlength=S) for j in range(num)])
  else:
    counts = np.ones((num, 1), np.int64)
  ri = {r: i for i, r in enumerate(rows)}
  row_sum = np.zeros((num, R, 4))
  row_cnt = np.zeros((num, R, 4))
  pair_sum = np.zeros((num, P, 4))
  pair_cnt = np.zeros((num, P, 4))
  # for the ID ECE ratio: sums of a and b over slots having both
  ra_sum, rb_sum = np.zeros((num, P)), np.zeros((num, P))
  for s, rec in enumerate(seeds):
    rep = np.repeat(np.arange(num), counts[:, s])  # replicate of each slot of this seed
    if len(rep) == 0:
      continue
    sets = ["in_domain"] + list(rec.get("ood", []))
    first_row = next(r for r in rows if r in rec["events"])
    sizes = {x: len(rec["events"][first_row][x]["correct"]) for x in sets}
    step = max(1, chunk_elems // max(sizes.values()))
    for lo in range(0, len(rep), step):
      part = rep[lo:lo + step]
      w = {x: resample_weights(rng, len(part), sizes[x]) for x in sets}
      v = seed_values(rec, rows, w)  # L x R x 4
      ok = ~np.isnan(v)
      _scatter(row_sum, part, np.where(ok, v, 0.0))
      _scatter(row_cnt, part, ok.astype(np.float64))
      for p, (a, b) in enumerate(pairs):
        if a not in ri or b not in ri:
          continue
        d = v[:, ri[a]] - v[:, ri[b]]
        okd = ~np.isnan(d)
        _scatter(pair_sum[:, p], part, np.where(okd, d, 0.0))
        _scatter(pair_cnt[:, p], part, okd.astype(np.float64))
        both = okd[:, 1]
        _scatter(ra_sum[:, p], part, np.where(both, v[:, ri[a], 1], 0.0))
        _scatter(rb_sum[:, p], part, np.where(both, v[:, ri[b], 1], 0.0))
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"rows": row_sum / row_cnt, "pairs": pair_sum / pair_cnt,
            "ratio": np.where(pair_cnt[:, :, 1] > 0, ra_sum / rb_sum - 1, np.nan)}


def _nanmean0(x: np.ndarray) -> np.ndarray:
  """Mean over axis 0 ignoring NaN; NaN where every entry is NaN (no warning)."""
  ok = ~np.isnan(x)
  cnt = ok.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(cnt > 0, np.where(ok, x, 0.0).sum(0) / cnt, np.nan)


def _scatter(acc: np.ndarray, rep: np.ndarray, vals: np.ndarray) -> None:
  """acc[rep[i]] += vals[i] (repeated indices accumulate)."""
  np.add.at(acc, rep, vals)


def interval(reps: np.ndarray) -> tuple[float, float]:
  reps = reps[~np.isnan(reps)]
  if len(reps) == 0:
    return float("nan"), float("nan")
  lo, hi = np.percentile(reps, [2.5, 97.5])
  return float(lo), float(hi)


# ----------------------------------------------------------------------------- aggregate

def _r(x):
  if x is None:
    return None
  if isinstance(x, (list, tuple)):
    return [_r(v) for v in x]
  x = float(x)
  return None if np.isnan(x) else round(x, 5)


def goal_items(paired: dict, ratio: dict, a: str) -> dict:
  """The three goal items for row a (first or first+ts); None where not evaluable."""
  ps, pt = paired.get(f"{a}-sft"), paired.get(f"{a}-sft+ts")
  out = {"id_ece_30pct_below_sft": None, "id_accuracy_not_lower_than_sft": None,
         "ood_ece_below_sft_ts": None, "ood_ece_below_sft_ts_ci_excludes_zero": None}
  if ps is not None:
    rel = ratio[f"{a}-sft"][0]
    if rel is not None and ps["id_ece"][2] is not None:
      out["id_ece_30pct_below_sft"] = bool(rel <= -0.30 and ps["id_ece"][2] < 0)
    if ps["id_accuracy"][2] is not None:
      out["id_accuracy_not_lower_than_sft"] = bool(ps["id_accuracy"][2] >= 0)
  if pt is not None and pt["ood_ece"][0] is not None:
    out["ood_ece_below_sft_ts"] = bool(pt["ood_ece"][0] < 0)
    out["ood_ece_below_sft_ts_ci_excludes_zero"] = bool(pt["ood_ece"][2] is not None
                                                        and pt["ood_ece"][2] < 0)
  main = [out[k] for k in ("id_ece_30pct_below_sft", "id_accuracy_not_lower_than_sft",
                           "ood_ece_below_sft_ts")]
  out["all_met"] = None if any(v is None for v in main) else all(main)
  return out


def aggregate(seeds: list[dict], num_bootstrap: int = 2000, config_name: str = "configs/trust.py",
              rng_seed: int = 0) -> dict:
  """Summary of the seed records (the --summary JSON), plus "_detail" for the markdown."""
  if not seeds:
    raise ValueError("no seed records to aggregate")
  rows = order_rows(seeds)
  point = np.stack([seed_values(rec, rows)[0] for rec in seeds])  # S x R x 4
  pairs = [p for p in PAIRS if p[0] in rows and p[1] in rows]
  reps = bootstrap_values(seeds, rows, pairs, num_bootstrap, rng_seed)
  row_mean = _nanmean0(point)
  n_seeds = {r: int((~np.isnan(point[:, i, 0])).sum()) for i, r in enumerate(rows)}
  out_rows = {}
  for i, r in enumerate(rows):
    out_rows[r] = {k: _r([row_mean[i, j], *interval(reps["rows"][:, i, j])])
                   for j, k in enumerate(KEYS)}
  paired, ratio = {}, {}
  for p, (a, b) in enumerate(pairs):
    ia, ib = rows.index(a), rows.index(b)
    d = point[:, ia] - point[:, ib]  # S x 4, NaN where a seed lacks either row
    both = ~np.isnan(d[:, 1])
    key = f"{a}-{b}"
    d_mean = _nanmean0(d)
    paired[key] = {k: _r([d_mean[j], *interval(reps["pairs"][:, p, j])])
                   for j, k in enumerate(KEYS)}
    rel = (point[both, ia, 1].mean() / point[both, ib, 1].mean() - 1) if both.any() else np.nan
    ratio[key] = _r([rel, *interval(reps["ratio"][:, p])])
    paired[key]["id_ece_relative"] = ratio[key]
  goal = {a: goal_items(paired, ratio, a) for a in ("first", "first+ts")}
  first = seeds[0]
  ev0 = first["events"][rows[0] if rows[0] in first["events"] else next(iter(first["events"]))]
  calib = [s.get("calibration", {}) for s in seeds]
  prem = calib[0].get("premise", {})
  holds = [c.get("premise", {}).get("holds") for c in calib]
  summary = {
      "config": config_name,
      "seeds": [s["tag"] for s in seeds],
      "n": {"val": calib[0].get("num_events"), "test": len(ev0["in_domain"]["correct"]),
            "ood_per_task": {o.split(":", 1)[-1]: len(ev0[o]["correct"])
                             for o in first.get("ood", [])}},
      "scoring": first.get("scoring"),
      "premise": {"teacher_val_confidence": _r(prem.get("teacher_val_confidence")),
                  "teacher_val_accuracy": _r(prem.get("teacher_val_accuracy")),
                  "t_log_space": _r(prem.get("t_log_space")),
                  "t_prob_softmax": _r(prem.get("t_prob_softmax")),
                  "holds": None if any(h is None for h in holds) else all(holds)},
      "rows": out_rows,
      "paired": {k: paired[k] for k in SUMMARY_PAIRS if k in paired},
      "goal": goal,
      "bootstrap": int(num_bootstrap),
  }
  summary["_detail"] = {"n_seeds": n_seeds, "paired_all": paired, "num_seeds": len(seeds)}
  return summary


def public(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- markdown

def _f(x, digits: int = 4) -> str:
  if x is None:
    return "-"
  x = float(x)
  return "-" if np.isnan(x) else f"{x:.{digits}f}"


def _ci(v, digits: int = 4) -> str:
  if v is None or v[0] is None:
    return "-"
  if v[1] is None:
    return _f(v[0], digits)
  return f"{_f(v[0], digits)} [{_f(v[1], digits)}, {_f(v[2], digits)}]"


def _seed_note(summary: dict, row: str) -> str:
  d = summary["_detail"]
  k = d["n_seeds"][row]
  return "" if k == d["num_seeds"] else f" (n={k})"


def main_table(summary: dict) -> str:
  lines = ["| row | ID accuracy | ID ECE | OOD accuracy | OOD ECE |", "|---|---|---|---|---|"]
  for r, v in summary["rows"].items():
    lines.append(f"| {r}{_seed_note(summary, r)} | " + " | ".join(_ci(v[k]) for k in KEYS)
                 + " |")
  return "\n".join(lines)


def headline(summary: dict) -> str:
  """The compact table README embeds: accuracy and ECE, in-domain and OOD mean, 95% CI."""
  lines = ["| model | ID accuracy | ID ECE | OOD accuracy | OOD ECE |", "|---|---|---|---|---|"]
  for r, v in summary["rows"].items():
    lines.append(f"| {r}{_seed_note(summary, r)} | "
                 + " | ".join(_ci(v[k], 3) for k in KEYS) + " |")
  return "\n".join(lines)


def paired_table(summary: dict) -> str:
  lines = ["| difference | ID accuracy | ID ECE | OOD accuracy | OOD ECE | ID ECE relative |",
           "|---|---|---|---|---|---|"]
  for key, v in summary["_detail"]["paired_all"].items():
    rel = v["id_ece_relative"]
    rel_s = "-" if rel[0] is None else (
        f"{100 * rel[0]:+.1f}% [{100 * rel[1]:+.1f}%, {100 * rel[2]:+.1f}%]"
        if rel[1] is not None else f"{100 * rel[0]:+.1f}%")
    lines.append(f"| {key} | " + " | ".join(_ci(v[k]) for k in KEYS) + f" | {rel_s} |")
  return "\n".join(lines)


def _mark(v) -> str:
  return "n/a" if v is None else ("**met**" if v else "**missed**")


def goal_text(summary: dict) -> str:
  paired = summary["_detail"]["paired_all"]
  out = []
  for a in ("first", "first+ts"):
    g = summary["goal"][a]
    ps, pt = paired.get(f"{a}-sft"), paired.get(f"{a}-sft+ts")
    head = ("FIRST" if a == "first" else
            "FIRST + post-hoc temperature scaling (informational)")
    out += [f"**{head}** (`{a}`):", ""]
    d1 = "rows missing" if ps is None else (
        f"relative change {_pct(ps['id_ece_relative'][0])}, paired difference "
        f"{_ci(ps['id_ece'])}")
    out.append(f"1. {a}'s in-domain ECE >= 30% below SFT's, with the paired difference's 95% "
               f"interval excluding zero: {d1}: {_mark(g['id_ece_30pct_below_sft'])}")
    d2 = "rows missing" if ps is None else f"paired accuracy difference {_ci(ps['id_accuracy'])}"
    out.append(f"2. {a}'s in-domain accuracy not lower than SFT's beyond the interval (upper "
               f"end >= 0): {d2}: {_mark(g['id_accuracy_not_lower_than_sft'])}")
    if pt is None:
      d3 = "rows missing"
    elif pt["ood_ece"][0] is None:
      d3 = "no out-of-domain sets"
    else:
      _, lo, hi = pt["ood_ece"]
      where = ("lies below zero" if hi is not None and hi < 0 else
               "lies above zero (FIRST's is higher)" if lo is not None and lo > 0 else
               "holds zero")
      d3 = f"paired OOD ECE difference vs sft+ts {_ci(pt['ood_ece'])}; the interval {where}"
    out.append(f"3. {a}'s out-of-domain ECE below SFT+TS's (point estimate): {d3}: "
               f"{_mark(g['ood_ece_below_sft_ts'])}")
    out.append("")
  return "\n".join(out).rstrip()


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:+.1f}%"


def _mean(vals) -> float:
  vals = [float(v) for v in vals if v is not None and not np.isnan(float(v))]
  return float(np.mean(vals)) if vals else float("nan")


def premise_text(summary: dict, seeds: list[dict]) -> str:
  p = summary["premise"]
  if p["teacher_val_confidence"] is None:
    return "No premise check in the seed records."
  verdict = "HOLDS" if p["holds"] else "DOES NOT HOLD"
  tail = seeds[0].get("calibration", {}).get("premise", {}).get("tail", "?")
  ece0 = seeds[0].get("calibration", {}).get("premise", {}).get("teacher_val_ece")
  return (f"FIRST's premise (the fine-tuned teacher is over-confident on held-out data, so the "
          f"searched log_space temperature is above 1): teacher validation confidence "
          f"{_f(p['teacher_val_confidence'])} vs accuracy {_f(p['teacher_val_accuracy'])} "
          f"(ECE {_f(ece0)}, {summary['n']['val']} validation "
          f"{'response tokens' if summary['scoring'] == 'tokens' else 'questions'}); searched t: "
          f"log_space {_f(p['t_log_space'])}, prob_softmax {_f(p['t_prob_softmax'])} "
          f"({tail} tail). The premise **{verdict}**"
          + ("" if len(seeds) == 1 else " (all seeds)") + ".")


def temperature_table(seeds: list[dict]) -> str:
  lines = ["| seed | search | best t | ECE at best t | ECE at the identity |",
           "|---|---|---|---|---|"]
  for rec in seeds:
    c = rec.get("calibration", {})
    raw = c.get("premise", {}).get("teacher_val_ece")
    for key, s in c.get("searches", {}).items():
      if key.startswith("log_space"):
        ident = _f(s.get("ece_at_identity"))
      else:
        ident = f"no identity; raw teacher {_f(raw)}"
      lines.append(f"| {rec['tag']} | {key} | {s['best_t']:.4g} | {_f(s['best_ece'])} | "
                   f"{ident} |")
  return "\n".join(lines)


def secondary_table(seeds: list[dict], rows: list[str], scoring: str) -> str:
  other = "vocab" if scoring == "choices" else "choices"
  cols = (("MCE", lambda m: m.get("mce")), ("Brier", lambda m: m.get("brier")),
          ("NLL", lambda m: m.get("nll")), ("ECE 15 bins", lambda m: m.get("ece15")),
          ("ECE equal-mass 10", lambda m: m.get("ece10_mass")),
          (f"{other} accuracy", lambda m: m.get(other, {}).get("accuracy")),
          (f"{other} ECE", lambda m: m.get(other, {}).get("ece")))
  lines = ["| row | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
  for r in rows:
    ms = [s["results"][r]["in_domain"] for s in seeds
          if r in s["results"] and "in_domain" in s["results"][r]]
    if not ms:
      continue
    lines.append(f"| {r} | " + " | ".join(_f(_mean([fn(m) for m in ms])) for _, fn in cols)
                 + " |")
  return "\n".join(lines)


def posthoc_table(seeds: list[dict], rows: list[str]) -> str:
  ts = [r for r in rows if r.endswith("+ts")]
  if not ts:
    return "No post-hoc rows."
  lines = ["| row | " + " | ".join(s["tag"] for s in seeds) + " | mean |",
           "|---|" + "---|" * (len(seeds) + 1)]
  for r in ts:
    vals = [s["results"].get(r, {}).get("in_domain", {}).get("temperature") for s in seeds]
    lines.append(f"| {r} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in vals)
                 + f" | {_mean(vals):.4g} |")
  return "\n".join(lines)


def topk_table(seeds: list[dict]) -> str:
  masses = [s.get("calibration", {}).get("topk_mass_mean") for s in seeds]
  masses = [m for m in masses if m]
  if not masses:
    return "No top-k mass in the seed records."
  kmax = min(len(m) for m in masses)
  mass = np.mean([m[:kmax] for m in masses], axis=0)
  ks = [k for k in TOPK if k <= kmax]
  return "\n".join(["| k | " + " | ".join(str(k) for k in ks) + " |",
                    "|---|" + "---|" * len(ks),
                    "| mass | " + " | ".join(f"{mass[k - 1]:.4f}" for k in ks) + " |"])


def store_table(seeds: list[dict]) -> str:
  """Store size per seed: per record (example) and per stored (scored) token where known."""
  lines = ["| seed | records | length L | slots P | k | dtype | bytes | B/record | scored tokens "
           "| B/scored token |", "|---|---|---|---|---|---|---|---|---|---|"]
  for s in seeds:
    st = s.get("store")
    if not st:
      continue
    rec, tokens = max(st["records"], 1), st.get("scored_tokens")
    per_token = f"{st['bytes'] / tokens:.1f}" if tokens else "-"
    lines.append(f"| {s['tag']} | {st['records']} | {st['seq_len']} | "
                 f"{st.get('positions', st['seq_len'])} | {st['k']} | {st['logprob_dtype']} | "
                 f"{st['bytes']} | {st['bytes'] / rec:.1f} | {tokens or '-'} | {per_token} |")
  return "\n".join(lines)


def choice_table(seeds: list[dict], rows: list[str]) -> str | None:
  """Choice tasks scored beside text data (`choice:<task>` sets), mean over seeds."""
  sets = sorted({k for s in seeds for r in s["results"].values() for k in r
                 if k.startswith("choice:")})
  if not sets:
    return None
  head = "| row | " + " | ".join(f"{t[len('choice:'):]} {m}" for t in sets
                                   for m in ("accuracy", "ECE", "NLL")) + " |"
  lines = [head, "|---|" + "---|" * (3 * len(sets))]
  for r in rows:
    vals = []
    for t in sets:
      for m in ("accuracy", "ece", "nll"):
        v = [s["results"][r][t][m] for s in seeds if r in s["results"] and t in s["results"][r]]
        vals.append(_f(_mean(v)) if v else "-")
    lines.append(f"| {r} | " + " | ".join(vals) + " |")
  n = next(s["results"][r][t]["n"] for s in seeds for r in s["results"] for t in sets
           if t in s["results"][r])
  return "\n".join(lines) + f"\n\n{n} questions each; a choice's score is the log-likelihood " \
      "of its text after the prompt, softmax over the choices (no interval: one seed's point " \
      "estimates)."


def human_table(seeds: list[dict], rows: list[str]) -> str | None:
  """Where the data has raters' label distributions (VADER): each row's distance from them
  (first_jax.evaluate.human_metrics), in-domain and the mean over out-of-domain sets, mean over
  seeds (point estimates from each seed's results.json)."""
  def cell(r, m, sets):
    v = [np.mean([s["results"][r][t][m] for t in sets(s)]) for s in seeds
         if r in s["results"] and sets(s)
         and all(m in s["results"][r].get(t, {}) for t in sets(s))]
    return _f(_mean(v)) if v else "-"
  in_d = lambda s: ["in_domain"]  # noqa: E731
  ood = lambda s: [t for t in s["results"][next(iter(s["results"]))] if t.startswith("ood:")]  # noqa: E731
  if not any("human_kl" in r.get("in_domain", {}) for s in seeds for r in s["results"].values()):
    return None
  metrics = ("human_kl", "human_ece", "human_agreement")
  lines = ["| row | " + " | ".join(f"ID {m}" for m in metrics) + " | "
           + " | ".join(f"OOD {m}" for m in metrics) + " |", "|---|" + "---|" * 6]
  for r in rows:
    lines.append(f"| {r} | " + " | ".join(cell(r, m, in_d) for m in metrics) + " | "
                 + " | ".join(cell(r, m, ood) for m in metrics) + " |")
  return "\n".join(lines) + (
      "\n\nhuman_kl: mean KL(raters' shares || the model's softmax over the choices), nats; "
      "human_ece: ECE (10 equal-width bins) of the model's confidence against the share of "
      "raters who chose its prediction; human_agreement: the mean of that share. Point "
      "estimates, mean over seeds.")


def timings_table(seeds: list[dict]) -> str:
  stages = []
  for s in seeds:
    stages += [k for k in s.get("timings", {}) if k not in stages]
  if not stages:
    return "No timings recorded."
  lines = ["| stage | seconds (mean over seeds) | seeds |", "|---|---|---|"]
  for k in stages:
    vals = [s["timings"][k] for s in seeds if k in s.get("timings", {})]
    lines.append(f"| {k} | {np.mean(vals):.1f} | {len(vals)} |")
  return "\n".join(lines)


def render(summary: dict, seeds: list[dict], title: str, name: str, out: str,
           reading: str | None) -> str:
  rows = list(summary["rows"])
  scoring = summary["scoring"] or "choices"
  n = summary["n"]
  unit = "response tokens" if scoring == "tokens" else "questions"
  ood = ", ".join(f"{t} {k}" for t, k in n["ood_per_task"].items()) or "none"
  B = summary["bootstrap"]
  provenance = os.path.join(out, f"{name}_provenance.md")
  note = []
  if os.path.exists(provenance):  # where the data came from, when it matters (kept on rebuild)
    with open(provenance) as f:
      note = [f.read().rstrip(), ""]
  human = human_table(seeds, rows)
  lines = [
      f"# Results: {title}", "", *note,
      f"Config `{summary['config']}`; {len(seeds)} student seed(s): "
      f"{', '.join(summary['seeds'])}. Sizes: {n['val']} validation {unit} (teacher "
      f"calibration), {n['test']} in-domain test {unit}, out-of-domain {ood}. Scoring "
      f"`{scoring}`: {SCORING_TEXT.get(scoring, scoring)}. Accuracy and ECE are recomputed from "
      f"the per-example events; ECE uses 10 equal-width bins (bin m holds confidences in "
      f"(m/10, (m+1)/10], float32 edges, as first_jax.core.calibration.ece); OOD = mean over the "
      f"out-of-domain tasks. Each cell is the mean over seeds [95% interval]: a two-level "
      f"bootstrap, {B} replicates (numpy seed 0), resampling the seeds with replacement "
      f"(when there are several) and then the examples of each set within each drawn seed, with "
      f"one index draw shared by all rows so that differences are paired; the interval is the "
      f"2.5/97.5 percentiles of the replicate means. `(n=k)`: a row only k seeds have.", "",
      "## Premise", "", premise_text(summary, seeds), "",
      "## Main table", "", main_table(summary), "",
      "## Paired differences", "",
      "Row a minus row b on the same seeds and the same resampled examples; relative = "
      "mean ID ECE of a / of b - 1.", "", paired_table(summary), "",
      "## Goal check", "", goal_text(summary), "",
      "## Teacher temperature search (per seed)", "",
      "ECE of the teacher's validation events as a function of the scaling temperature; the "
      "identity is t = 1 in log_space (prob_softmax has none, so the raw teacher's ECE is "
      "given).", "", temperature_table(seeds), "",
      "## Secondary metrics (in-domain, mean over seeds)", "",
      f"From the evaluation's results.json under `{scoring}` scoring, plus the other scoring's "
      "accuracy and ECE.", "", secondary_table(seeds, rows, scoring), "",
      "## Post-hoc temperatures", "",
      "Temperature of each `+ts` row, fitted on validation (NLL).", "",
      posthoc_table(seeds, rows), "",
      "## Concentrated knowledge", "",
      f"Mean teacher probability mass inside its top-k at the validation {unit} "
      "(mean over seeds):", "", topk_table(seeds), "",
      *(["## Choice tasks beside the text data", "", choice_table(seeds, rows), ""]
        if choice_table(seeds, rows) else []),
      *(["## Against the human raters", "", human, ""] if human else []),
      "## Store and wall-clock", "", store_table(seeds), "", timings_table(seeds), "",
      "## Figures (first seed)", ""]
  figs = [f for f in FIGURES
          if os.path.exists(os.path.join(out, "results", "figures", f"{name}_{f}.png"))]
  lines += [f"![{f}](results/figures/{name}_{f}.png)" for f in figs] or ["No figures."]
  lines.append("")
  if reading and os.path.exists(reading):
    with open(reading) as f:
      lines += [f.read().rstrip(), ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def build(out: str, name: str, title: str, num_bootstrap: int = 2000,
          summary_path: str | None = None, reading: str | None = None,
          config_name: str = "configs/trust.py") -> dict:
  """Step 2: aggregate every seed record of `name` under `out` and write the outputs."""
  seeds = load_seeds(out, name)
  if not seeds:
    raise SystemExit(f"no seed records {os.path.join(out, 'results', name + '_*.json')}")
  summary = aggregate(seeds, num_bootstrap, config_name)
  if reading is None:
    reading = os.path.join(out, f"{name}_reading.md")
  md = render(summary, seeds, title, name, out, reading)
  atomic_write(os.path.join(out, f"{name}.md"), md)
  atomic_write(os.path.join(out, "results", f"{name}_headline.md"), headline(summary) + "\n")
  if summary_path:
    atomic_write(summary_path, json.dumps(public(summary), indent=1, sort_keys=True) + "\n")
  return summary


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", nargs="+", help="run workdirs, one per seed (collect step)")
  ap.add_argument("--aggregate-only", action="store_true",
                  help="skip collecting: rebuild the report from <out>/results/NAME_*.json")
  ap.add_argument("--add-rows", action="store_true",
                  help="collect: add each run's models to its committed seed record (the same "
                       "seed evaluated again with more students) instead of replacing it")
  ap.add_argument("--name", required=True, help="report name: <out>/NAME.md, seed files NAME_<tag>")
  ap.add_argument("--title", default=None, help="report title (default: NAME)")
  ap.add_argument("--out", required=True, help="the docs folder the report and seed records go to")
  ap.add_argument("--summary", default=None, help="write the summary JSON here")
  ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
  ap.add_argument("--reading", default=None,
                  help="markdown appended to the report (default <out>/NAME_reading.md)")
  ap.add_argument("--config-name", default="configs/trust.py",
                  help="config named in the report and the summary")
  args = ap.parse_args(argv)
  if not args.aggregate_only and not args.runs:
    ap.error("--runs is required unless --aggregate-only")
  if args.aggregate_only and args.runs:
    ap.error("--aggregate-only takes no --runs")
  if args.bootstrap < 1:
    ap.error("--bootstrap: expected >= 1")
  if not args.aggregate_only:
    for p in collect(args.runs, args.out, args.name, add=args.add_rows):
      print(f"wrote {p}")
  summary = build(args.out, args.name, args.title or args.name, args.bootstrap, args.summary,
                  args.reading, args.config_name)
  print(f"wrote {os.path.join(args.out, args.name + '.md')} from {len(summary['seeds'])} "
        f"seed(s): {', '.join(summary['seeds'])}")
  print(headline(summary))
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
