"""Example sources: task files, datasets and toy tasks -> `MCExample` / `TextExample` lists.

Owns the example types and their loaders: `load_bigbench` (BIG-bench task.json), `load_hf`
(a `datasets` dataset or a local json/jsonl/parquet/csv file), `load_jsonl_instructions`
(Alpaca-style records) and `synthetic_mcqa` (a learnable toy task). Formatting, tokenization,
splits and batching live in `first_jax.data`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import string
from typing import Any, Mapping, Sequence

import numpy as np

from first_jax.errors import UserError

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase  # Answer letters: label parsing here, prompts in data.


@dataclasses.dataclass(frozen=True)
class MCExample:
  input: str
  choices: list[str]
  label: int
  source: str = ""


@dataclasses.dataclass(frozen=True)
class TextExample:
  prompt: str
  response: str


Example = MCExample | TextExample


def load_bigbench(task_json_path: str | os.PathLike, shuffle_choices_seed: int | None = 0,
                  use_task_prefix: bool = True) -> list[MCExample]:
  """BIG-bench task.json -> MCExamples; skips (and logs) examples without one best choice.

  The correct choice is the unique one with the highest score > 0. Many tasks list the correct
  choice first, so choices are shuffled per example with rng([shuffle_choices_seed, index])
  (None keeps the file's order). A `task_prefix` is put on its own line before each input.
  """
  path = os.fspath(task_json_path)
  try:
    with open(path, encoding="utf-8") as f:
      task = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: expected a readable BIG-bench task.json ({e})") from None
  if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
    raise UserError(f"{path}: expected an 'examples' list (for a task with subtasks, use a "
                    "subtask's task.json)")
  name = str(task.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path))))
  prefix = str(task.get("task_prefix") or "").strip() if use_task_prefix else ""
  out, skipped = [], 0
  for i, ex in enumerate(task["examples"]):
    scores = ex.get("target_scores") if isinstance(ex, dict) else None
    if not isinstance(scores, dict) or len(scores) < 2 or "input" not in ex:
      skipped += 1
      continue
    choices, values = [str(c) for c in scores], [float(v) for v in scores.values()]
    best = max(values)
    if best <= 0 or values.count(best) != 1:
      skipped += 1
      continue
    label = values.index(best)
    if shuffle_choices_seed is not None:
      perm = np.random.default_rng([shuffle_choices_seed, i]).permutation(len(choices))
      choices, label = [choices[j] for j in perm], int(np.flatnonzero(perm == label)[0])
    text = f"{prefix}\n{ex['input']}" if prefix else str(ex["input"])
    out.append(MCExample(text, choices, label, name))
  if skipped:
    log.warning("%s: skipped %d of %d examples without exactly one correct choice",
                path, skipped, len(task["examples"]))
  return out


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _parse_label(value: Any, choices: Sequence[str], letters: str) -> int:
  """int (or digit string) -> index; one letter of `letters` -> its index; else a choice's text."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    idx = int(value)
  elif isinstance(value, str) and value.strip().isdigit():
    idx = int(value.strip())
  elif isinstance(value, str) and len(value.strip()) == 1 and value.strip() in letters:
    idx = letters.index(value.strip())
  elif isinstance(value, str) and value in choices:
    idx = list(choices).index(value)
  else:
    raise ValueError(f"label {value!r} is neither an index, a letter nor a choice's text")
  if not 0 <= idx < len(choices):
    raise ValueError(f"label {value!r} is out of range for {len(choices)} choices")
  return idx


def load_hf(path_or_name: str, split: str, fields: Mapping[str, Any],
            data_files: str | list[str] | Mapping[str, Any] | None = None, *,
            name: str | None = None, cache_dir: str | None = None,
            letters: str = LETTERS) -> list[MCExample]:
  """A `datasets` dataset -> MCExamples via `fields` = {input: col, choices: col, label: col}.

  `path_or_name`: "json" / "parquet" / "csv" with local `data_files`, a local data file, or a hub
  name. `choices` is a list column, a {"text": [...]} column, or a list of columns (one per
  choice). Label rule: an int (or digit string) is an index; a single letter of `letters` is a
  letter; any other string must equal one choice's text.
  """
  import datasets  # Heavy; only needed for this source.

  missing = {"input", "choices", "label"} - set(fields)
  if missing:
    raise UserError(f"data.fields: missing {sorted(missing)} (need input, choices, label)")
  builder = path_or_name
  if data_files is None and os.path.isfile(path_or_name):
    builder, data_files = _BUILDERS.get(os.path.splitext(path_or_name)[1], ""), path_or_name
    if not builder:
      raise UserError(f"{path_or_name}: expected a .json, .jsonl, .parquet or .csv file")
  if isinstance(data_files, (str, os.PathLike, list, tuple)):
    data_files = {split: data_files}  # So any split name works for plain local files.
  first = (data_files.get(split) or next(iter(data_files.values()), None)) if data_files else None
  first = first[0] if isinstance(first, (list, tuple)) and first else first
  source = os.path.basename(os.fspath(first)) if builder in _BUILDERS.values() and first else (
      path_or_name)
  try:
    ds = datasets.load_dataset(builder, name=name, split=split, data_files=data_files,
                               cache_dir=cache_dir)
  except Exception as e:  # Anything here is a bad name, file or split given by the user.
    msg = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"{path_or_name}: could not load split {split!r} ({type(e).__name__}: "
                    f"{msg})") from None
  ccol = fields["choices"]
  cols = [fields["input"], fields["label"]] + (list(ccol) if isinstance(ccol, list) else [ccol])
  for c in cols:
    if c not in ds.column_names:
      raise UserError(f"data.fields: column {c!r} not in {path_or_name} (has {ds.column_names})")
  out = []
  for i, row in enumerate(ds):
    choices = [row[c] for c in ccol] if isinstance(ccol, list) else row[ccol]
    if isinstance(choices, dict):
      choices = choices.get("text")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
      raise UserError(f"{path_or_name}: row {i}: column {ccol!r}: expected a list of >= 2 choices")
    choices = [str(c) for c in choices]
    try:
      label = _parse_label(row[fields["label"]], choices, letters)
    except ValueError as e:
      raise UserError(f"{path_or_name}: row {i}: {e}") from None
    out.append(MCExample(str(row[fields["input"]]), choices, label, source))
  return out


def load_jsonl_instructions(path: str | os.PathLike, prompt_field: str = "instruction",
                            input_field: str = "input",
                            response_field: str = "output") -> list[TextExample]:
  """Alpaca-style JSONL (or a JSON list) -> TextExample(instruction [+ "\n\n" + input], output)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: expected JSON lines or a JSON list of records ({e})") from None
  out = []
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or prompt_field not in row or response_field not in row:
      raise UserError(f"{path}: record {i}: expected fields {prompt_field!r}, {response_field!r}")
    extra = str(row.get(input_field) or "").strip()
    prompt = str(row[prompt_field]) + (f"\n\n{extra}" if extra else "")
    out.append(TextExample(prompt, str(row[response_field])))
  return out


_SYNTH = (("Which number is the largest?", "max"), ("Which of these is the biggest number?", "max"),
          ("Which number is the smallest?", "min"), ("Pick the lowest number.", "min"),
          ("Which number is even?", "even"))
# An easier kind (word categories), which a two-layer model learns in a few hundred steps.
_CATEGORIES = {
    "an animal": ("dog", "cat", "horse", "mouse", "tiger", "sheep"),
    "a color": ("red", "blue", "green", "yellow", "purple", "orange"),
    "a fruit": ("apple", "banana", "cherry", "grape", "lemon", "peach"),
    "a country": ("France", "Japan", "Brazil", "Canada", "Egypt", "India"),
    "a tool": ("hammer", "saw", "drill", "wrench", "shovel", "chisel"),
}


def _category_example(rng: np.random.Generator, num_choices: int) -> tuple[str, list[str], int]:
  names = list(_CATEGORIES)
  picked = rng.choice(len(names), num_choices, replace=False)
  words = [str(rng.choice(_CATEGORIES[names[i]])) for i in picked]
  return f"Which one is {names[picked[0]]}?", words, 0


def synthetic_mcqa(n: int, seed: int, num_choices: int = 4,
                   kind: str = "numbers") -> list[MCExample]:
  """A deterministic, learnable toy MCQA task, labels balanced.

  kind "numbers": largest / smallest / even number; kind "categories": which word is an animal,
  a color, ... (at most 5 choices).
  """
  limit = len(_CATEGORIES) if kind == "categories" else len(LETTERS)
  if not 2 <= num_choices <= limit:
    raise UserError(f"data.num_choices: expected 2..{limit}, got {num_choices}")
  if kind not in ("numbers", "categories"):
    raise UserError(f"data.synthetic_kind: expected numbers or categories, got {kind!r}")
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % num_choices)
  out = []
  for label in labels:
    question, rule = _SYNTH[rng.integers(len(_SYNTH))]
    if kind == "categories":
      question, values, answer = _category_example(rng, num_choices)
      values[answer], values[label] = values[label], values[answer]
      out.append(MCExample(question, values, int(label), "synthetic"))
      continue
    if rule == "even":  # One even number among odd ones; the even one starts at index 0.
      values = rng.choice(np.arange(1, 100, 2), num_choices, replace=False)
      values[0], answer = rng.choice(np.arange(2, 100, 2)), 0
    else:
      values = rng.choice(np.arange(1, 100), num_choices, replace=False)
      answer = int(np.argmax(values) if rule == "max" else np.argmin(values))
    values[[answer, label]] = values[[label, answer]]
    out.append(MCExample(question, [str(v) for v in values], int(label), "synthetic"))
  return out
