"""Tests for first_jax.data.sources: BIG-bench and datasets loaders (choice and text), label rule,
toy task."""
import json
import logging

import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.data import sources


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
  with caplog.at_level(logging.WARNING, logger="first_jax.data.sources"):
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


def _write_task(tmp_path, examples, prefix="Answer the question.\n", name="task.json"):
  path = tmp_path / name
  path.write_text(json.dumps({"name": "toy", "task_prefix": prefix, "examples": examples}))
  return path


def test_load_bigbench_text_generative_and_choice(tmp_path):
  rng = np.random.default_rng(int(np.random.default_rng().integers(10**6)))
  exs, want = [], []
  for i in range(8):
    answer = f"answer {i} {rng.integers(10**6)}"
    kind = i % 3
    if kind == 0:  # A string target.
      exs.append({"input": f"question {i}?", "target": answer})
    elif kind == 1:  # A list of targets: the first one is the response.
      exs.append({"input": f"question {i}?", "target": [answer, "another", "third"]})
    else:  # Multiple choice; a "target" alongside does not override the gold choice.
      scores = {f"wrong {i}-{j}": 0 for j in range(int(rng.integers(1, 5)))}
      scores[answer] = 1
      keys = list(scores)
      rng.shuffle(keys)
      exs.append({"input": f"question {i}?", "target": "ignored",
                  "target_scores": {k: scores[k] for k in keys}})
    want.append((f"question {i}?", answer))
  path = _write_task(tmp_path, exs)
  got = sources.load_bigbench_text(path)
  assert got == [sources.TextExample("Answer the question.\n" + q, a) for q, a in want]
  templated = sources.load_bigbench_text(path, answer_template="Sentiment: {answer}.",
                                         use_task_prefix=False)
  assert templated == [sources.TextExample(q, f"Sentiment: {a}.") for q, a in want]
  # The MC examples are the ones load_bigbench reads, with the same gold answer.
  mc = sources.load_bigbench(path, use_task_prefix=False)
  assert [(e.input, e.choices[e.label]) for e in mc] == [w for w, e in zip(want, exs)
                                                         if "target_scores" in e]
  for bad_template in ("Sentiment: {label}", "no field", "{answer"):
    with pytest.raises(UserError, match="answer_template"):
      sources.load_bigbench_text(path, answer_template=bad_template)


_BAD_BIGBENCH = [
    ({"input": "two right", "target_scores": {"x": 1, "y": 1, "z": 0}}, "record 1: field "
     "'target_scores'"),
    ({"input": "none right", "target_scores": {"x": 0, "y": 0}}, "record 2: field 'target_scores'"),
    ({"input": "", "target": "foo"}, "record 3: field 'input'"),
    ({"input": "q", "target": "   "}, "record 4: field 'target'"),
    ({"input": "q", "target": []}, "record 5: field 'target'"),
    ({"input": "q", "target": None}, "record 6: field 'target'"),
    ({"input": "q"}, "record 7: expected a 'target' or 'target_scores'"),
    ("just a string", "record 8: expected an object"),
    ({"target": "no input"}, "record 9: field 'input'"),
    ({"input": "q", "target": {"a": 1}}, "record 10: field 'target'"),
]


@pytest.mark.parametrize("case", range(len(_BAD_BIGBENCH)))
def test_load_bigbench_text_bad_example_errors(tmp_path, case):
  bad, where = _BAD_BIGBENCH[case]
  good = {"input": "fine", "target": "ok"}
  examples = [good] * (case + 1) + [bad] + [good]  # `where` names record case + 1.
  path = _write_task(tmp_path, examples, name=f"bad{case}.json")
  with pytest.raises(UserError, match=f"bad{case}.json") as info:
    sources.load_bigbench_text(path)
  assert "\n" not in str(info.value) and where in str(info.value)


def test_load_bigbench_text_skips_and_counts(tmp_path, caplog):
  rng = np.random.default_rng(int(np.random.default_rng().integers(10**6)))
  good = [{"input": f"q{i}", "target": f"a{i}"} for i in range(5)]
  bads = [b for b, _ in _BAD_BIGBENCH]
  order = rng.permutation(len(good) + len(bads))
  pool = good + bads
  examples = [pool[j] for j in order]
  path = _write_task(tmp_path, examples, prefix="")
  with caplog.at_level(logging.WARNING, logger="first_jax.data.sources"):
    got = sources.load_bigbench_text(path, on_bad="skip")
  assert got == [sources.TextExample(pool[j]["input"], pool[j]["target"])
                 for j in order if j < len(good)]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  first_bad = int(np.flatnonzero(order >= len(good))[0])
  assert f"{len(bads)} of {len(examples)} records skipped: record {first_bad}:" in caplog.text
  with pytest.raises(UserError, match="data.on_bad_example"):
    sources.load_bigbench_text(path, on_bad="drop")


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


_ALPACA = {"prompt": "instruction", "context": "input", "response": "output"}


def test_load_hf_text_alpaca_jsonl(tmp_path):
  rng = np.random.default_rng(int(np.random.default_rng().integers(10**6)))
  rows, want = [], []
  for i in range(9):
    row = {"instruction": f"Task {i}: {rng.integers(10**6)}.", "output": f"out {i}"}
    kind = i % 3  # The optional `input`: present and non-empty, empty, or absent from the row.
    if kind == 0:
      row["input"] = f"context {i}"
    elif kind == 1:
      row["input"] = ""
    rows.append(row)
    want.append(sources.TextExample(row["instruction"] + (f"\n\ncontext {i}" if kind == 0 else ""),
                                    row["output"]))
  path = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
  cache = str(tmp_path / "c")
  assert sources.load_hf_text(path, "train", _ALPACA, cache_dir=cache) == want
  assert sources.load_hf_text("json", "validation", _ALPACA, data_files=path,
                              cache_dir=cache) == want
  (tmp_path / "alpaca.json").write_text(json.dumps(rows))  # Alpaca's own JSON list form.
  assert sources.load_hf_text(str(tmp_path / "alpaca.json"), "train", _ALPACA,
                              cache_dir=cache) == want
  # No context column at all is fine; a missing prompt or response column is not.
  no_ctx = _write_jsonl(tmp_path / "noctx.jsonl",
                        [{k: v for k, v in r.items() if k != "input"} for r in rows])
  assert sources.load_hf_text(no_ctx, "train", _ALPACA, cache_dir=cache) == [
      sources.TextExample(r["instruction"], r["output"]) for r in rows]
  assert sources.load_hf_text(path, "train", {"prompt": "instruction", "response": "output"},
                              cache_dir=cache)[0].prompt == rows[0]["instruction"]
  for col in ("answer", "question"):
    fields = dict(_ALPACA, **({"response": col} if col == "answer" else {"prompt": col}))
    with pytest.raises(UserError, match=f"'{col}' not in .*instruction") as info:
      sources.load_hf_text(path, "train", fields, cache_dir=cache)
    assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="missing \\['response'\\]"):
    sources.load_hf_text(path, "train", {"prompt": "instruction"}, cache_dir=cache)
  with pytest.raises(UserError, match="data.on_bad_example.*'warn'"):
    sources.load_hf_text(path, "train", _ALPACA, cache_dir=cache, on_bad="warn")


def test_load_hf_text_bad_rows(tmp_path, caplog):
  rows = [{"instruction": "Say hi.", "input": "", "output": "hi"},
          {"instruction": "Count.", "input": "1, 2", "output": 3},  # A number is str()-ed.
          {"instruction": "Empty.", "input": "x", "output": ""},
          {"instruction": "Blank.", "output": "  \n"},
          {"instruction": None, "output": "no prompt"},
          {"instruction": "Ok.", "output": "fine"}]
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  cache = str(tmp_path / "c")
  with pytest.raises(UserError, match=r"bad\.jsonl: row 2: column 'output': expected a non-empty "
                     "string, got ''") as info:
    sources.load_hf_text(path, "train", _ALPACA, cache_dir=cache)
  assert "\n" not in str(info.value)
  with caplog.at_level(logging.WARNING, logger="first_jax.data.sources"):
    got = sources.load_hf_text(path, "train", _ALPACA, cache_dir=cache, on_bad="skip")
  assert got == [sources.TextExample("Say hi.", "hi"), sources.TextExample("Count.\n\n1, 2", "3"),
                 sources.TextExample("Ok.", "fine")]
  assert "bad.jsonl: 3 of 6 records skipped: row 2: column 'output'" in caplog.text
  assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


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
