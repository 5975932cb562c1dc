"""Tests for first_jax.sources: BIG-bench, datasets and JSONL loaders, label rule, toy task."""
import json
import logging

import numpy as np
import pytest

from first_jax import sources
from first_jax.errors import UserError


def test_load_bigbench_skips_bad_and_shuffles(tmp_path, caplog):
  rng = np.random.default_rng()
  good = []
  for i in range(6):
    k = int(rng.integers(2, 6))
    scores = {f"choice {i}-{j}-{rng.integers(1000)}": 0 for j in range(k)}
    correct = list(scores)[int(rng.integers(k))]
    scores[correct] = 1
    good.append(({"input": f"question {i}?", "target_scores": scores}, correct))
  bad = [{"input": "two right", "target_scores": {"x": 1, "y": 1, "z": 0}},
         {"input": "none right", "target_scores": {"x": 0, "y": 0}},
         {"input": "generative", "target": "foo"}]
  task = {"name": "toy", "task_prefix": "Answer the question.\n",
          "examples": [g for g, _ in good[:3]] + bad + [g for g, _ in good[3:]]}
  path = tmp_path / "task.json"
  path.write_text(json.dumps(task))
  with caplog.at_level(logging.WARNING, logger="first_jax.sources"):
    exs = sources.load_bigbench(path)
  assert "skipped 3 of 9" in caplog.text
  assert len(exs) == 6
  for ex, (g, correct) in zip(exs, good):
    assert ex.input == "Answer the question.\n" + g["input"]
    assert ex.choices[ex.label] == correct
    assert sorted(ex.choices) == sorted(g["target_scores"])
    assert ex.source == "toy"
  assert sources.load_bigbench(path) == exs  # Deterministic shuffle.
  plain = sources.load_bigbench(path, shuffle_choices_seed=None, use_task_prefix=False)
  assert [e.choices for e in plain] == [list(g["target_scores"]) for g, _ in good]
  assert plain[0].input == good[0][0]["input"]
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(UserError, match="broken.json"):
    sources.load_bigbench(tmp_path / "broken.json")


def _hf_rows(rng, n):
  rows = []
  for i in range(n):
    opts = [f"opt{i}_{j}_{rng.integers(10**6)}" for j in range(4)]
    rows.append({"q": f"What is item {i}?", "opts": opts, "ans": int(rng.integers(4))})
  return rows


def test_load_hf_jsonl_int_labels(tmp_path):
  rows = _hf_rows(np.random.default_rng(), 7)
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  fields = {"input": "q", "choices": "opts", "label": "ans"}
  exs = sources.load_hf("json", "validation", fields, data_files=str(path),
                     cache_dir=str(tmp_path / "c"))
  assert [(e.input, e.choices, e.label, e.source) for e in exs] == [
      (r["q"], r["opts"], r["ans"], "d.jsonl") for r in rows]
  # A bare local file path works too.
  assert sources.load_hf(str(path), "train", fields, cache_dir=str(tmp_path / "c")) == exs
  with pytest.raises(UserError, match="'nope'"):
    sources.load_hf("json", "train", dict(fields, label="nope"), data_files=str(path),
                 cache_dir=str(tmp_path / "c"))


def test_load_hf_parquet_letter_and_text_labels(tmp_path):
  import datasets
  rng = np.random.default_rng()
  rows = _hf_rows(rng, 9)
  for i, r in enumerate(rows):  # Labels as letters, or as the answer text.
    r["ans"] = "ABCD"[r["ans"]] if i % 2 else r["opts"][r["ans"]]
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
  exs = sources.load_hf("parquet", "test", {"input": "q", "choices": "opts", "label": "ans"},
                     data_files=str(tmp_path / "d.parquet"), cache_dir=str(tmp_path / "c"))
  for e, r in zip(exs, rows):
    assert e.choices == r["opts"]
    if len(r["ans"]) == 1:
      assert e.label == "ABCD".index(r["ans"])
    else:
      assert e.choices[e.label] == r["ans"]
  rows[0]["ans"] = "not a choice"
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
  with pytest.raises(UserError, match="row 0"):
    sources.load_hf("parquet", "test", {"input": "q", "choices": "opts", "label": "ans"},
                 data_files=str(tmp_path / "bad.parquet"), cache_dir=str(tmp_path / "c"))


def test_parse_label_rule():
  choices = ["red", "green", "B"]
  assert sources._parse_label(2, choices, sources.LETTERS) == 2
  assert sources._parse_label("1", choices, sources.LETTERS) == 1
  # A letter wins over a choice text.
  assert sources._parse_label("B", choices, sources.LETTERS) == 1
  assert sources._parse_label("green", choices, sources.LETTERS) == 1
  with pytest.raises(ValueError):
    sources._parse_label(3, choices, sources.LETTERS)


def test_load_jsonl_instructions(tmp_path):
  rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "hi"}]
  path = tmp_path / "alpaca.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  exs = sources.load_jsonl_instructions(path)
  assert exs == [sources.TextExample("Add the numbers.\n\n2 and 3", "5"),
                 sources.TextExample("Say hi.", "hi")]
  (tmp_path / "alpaca.json").write_text(json.dumps(rows))  # Alpaca's own JSON list form.
  assert sources.load_jsonl_instructions(tmp_path / "alpaca.json") == exs
  with pytest.raises(UserError, match="record 0"):
    sources.load_jsonl_instructions(path, response_field="answer")


def test_synthetic_mcqa_deterministic_balanced_correct():
  seed = int(np.random.default_rng().integers(10**6))
  exs = sources.synthetic_mcqa(203, seed, num_choices=4)
  assert exs == sources.synthetic_mcqa(203, seed, num_choices=4)
  assert exs != sources.synthetic_mcqa(203, seed + 1, num_choices=4)
  counts = np.bincount([e.label for e in exs], minlength=4)
  assert counts.max() - counts.min() <= 1
  assert len({e.input for e in exs}) >= 4  # Varied templates.
  for e in exs:
    v = np.array([int(c) for c in e.choices])
    assert len(set(v.tolist())) == 4
    if "even" in e.input:
      assert v[e.label] % 2 == 0 and (np.delete(v, e.label) % 2 == 1).all()
    elif "larg" in e.input or "bigg" in e.input:
      assert v[e.label] == v.max()
    else:
      assert v[e.label] == v.min()
