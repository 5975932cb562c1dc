"""bench/studies.py: the cross-study table says what each study's summary says."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench import studies  # noqa: E402


def test_verdict_reads_the_interval_of_a_lower_is_better_difference():
  assert studies.verdict([-0.05, -0.08, -0.01]) == "wins"
  assert studies.verdict([0.03, 0.01, 0.05]) == "loses"
  assert studies.verdict([-0.01, -0.03, 0.002]) == "ties"
  assert studies.verdict([None, None, None]) == "-"


def test_the_multiemo_column_is_its_summary():
  with open(os.path.join(ROOT, "docs", "results", "summary.json")) as f:
    s = json.load(f)
  r = studies.row("multiemo", s, "x", "float32", False)
  d = s["paired"]["first-sft"]["id_ece"]
  assert r["first_sft_id"] == f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] wins"
  assert r["seeds"] == len(s["seeds"]) == 3 and "not reproducible" in r["study"]
  gap = s["rows"]["teacher"]["id_accuracy"][0] - s["rows"]["sft"]["id_accuracy"][0]
  assert r["gap"] == f"{gap:+.3f}"
  text = studies.table([r, r])
  assert text.count("\n") == len(studies.COLUMNS) + 1  # header, rule, a line per figure
  assert "| FIRST - SFT ID ECE | " + r["first_sft_id"] + " | " in text


def test_without_a_teacher_row_the_gap_is_from_its_validation_accuracy_and_says_so():
  with open(os.path.join(ROOT, "docs", "results", "summary.json")) as f:
    s = json.load(f)
  del s["rows"]["teacher"]
  r = studies.row("x", s, "x", "bfloat16", True)
  gap = s["premise"]["teacher_val_accuracy"] - s["rows"]["sft"]["id_accuracy"][0]
  assert r["gap"] == f"{gap:+.3f} (teacher on validation)"


def test_quartz_twins_are_found_by_options_and_stem():
  from bench import quartz_twins

  def q(stem, a, b, ideal):
    return {"input": [{"role": "user", "content": f"{stem}\n\n A: {a}\n B: {b}"}],
            "ideal": ideal}
  rows = [q("Eric adds more resistors to the circuit. The resistance", "increases", "decreases",
            "A"),
          q("Eric adds fewer resistors to the circuit. The resistance", "increases", "decreases",
            "B"),  # the twin, answer flipped
          q("Eric adds more resistors to the circuit. The resistance", "decreases", "increases",
            "B"),  # same answer text, options in another order
          q("Sound gets closer to a speaker and becomes", "louder", "quieter", "A")]
  kinds = quartz_twins.twin_kinds(rows, train=[0], test=[1, 2, 3])
  assert list(kinds) == ["flipped", "same", "none"]
