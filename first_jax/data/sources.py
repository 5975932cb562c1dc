"""Example sources: task files, datasets and toy tasks -> `MCExample` / `TextExample` lists.

Owns the example types and their loaders. Choice examples (`MCExample`): `load_vader` (VADER's
human-rated sentiment sentences, with each sentence's human label distribution), `load_evals`
(a multiple-choice file of OpenAI's evals registry), `load_bigbench` (BIG-bench task.json),
`load_hf` (a `datasets` dataset or a local json/jsonl/parquet/csv file) and `synthetic_mcqa` (a
learnable toy task). Prompt/response examples (`TextExample`):
`load_bigbench_text` (generative targets, or a multiple-choice gold answer phrased through a
template) and `load_hf_text` (prompt [+ context] / response columns; Alpaca JSON(L) works as a
local file). The text loaders' bad records (missing, empty or non-string prompt or response)
either raise a one-line `UserError` (on_bad="error") or are skipped, counted and logged once
(on_bad="skip"). Formatting, tokenization, splits and batching live in `first_jax.data.batches`.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import html
import json
import logging
import os
import re
import string
import tarfile
from typing import Any, Mapping, Sequence

import numpy as np

from first_jax.runtime.errors import UserError

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase  # Answer letters: label parsing here, prompts in data.


@dataclasses.dataclass(frozen=True)
class MCExample:
  input: str
  choices: list[str]
  label: int
  source: str = ""
  # the share of human raters who chose each choice (sums to 1), where a source has raters
  human: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TextExample:
  prompt: str
  response: str


Example = MCExample | TextExample


ON_BAD = ("error", "skip")


class _BadRecords:
  """The on_bad_example policy of the text loaders: raise at once, or skip, count and log once."""

  def __init__(self, where: str, on_bad: str):
    if on_bad not in ON_BAD:
      raise UserError(f"data.on_bad_example: expected one of {list(ON_BAD)}, got {on_bad!r}")
    self.where, self.on_bad, self.count, self.first = where, on_bad, 0, ""

  def __call__(self, reason: str) -> None:
    """`reason` names the record and field ("record 3: field 'target': expected ...")."""
    if self.on_bad == "error":
      raise UserError(f"{self.where}: {reason} (or set data.on_bad_example=skip)")
    self.count += 1
    self.first = self.first or reason

  def log(self, total: int) -> None:
    if self.count:
      log.warning("%s: %d of %d records skipped: %s%s", self.where, self.count, total, self.first,
                  f" (the first of {self.count})" if self.count > 1 else "")


def _text(value: Any) -> str | None:
  """A record's prompt / response: a non-blank string (non-None scalars via str()), else None."""
  if isinstance(value, (str, int, float, bool, np.generic)):
    value = str(value)
    return value if value.strip() else None
  return None


def _expected(kind: str, field: str, value: Any) -> str:
  shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
  return f"{kind} {field!r}: expected a non-empty string, got {shown}"


def _read_bigbench(task_json_path: str | os.PathLike,
                   use_task_prefix: bool) -> tuple[str, list[Any], str, str]:
  """-> (path, examples, task name, task prefix ("" when unused or absent))."""
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
  return path, task["examples"], name, prefix


def _gold_choice(ex: Any) -> tuple[list[str], int] | None:
  """A multiple-choice example -> (choices, gold index): the unique best score > 0 of >= 2."""
  scores = ex.get("target_scores") if isinstance(ex, dict) else None
  if not isinstance(scores, dict) or len(scores) < 2 or "input" not in ex:
    return None
  try:
    values = [float(v) for v in scores.values()]
  except (TypeError, ValueError):
    return None
  best = max(values)
  if best <= 0 or values.count(best) != 1:
    return None
  return [str(c) for c in scores], values.index(best)


def load_bigbench(task_json_path: str | os.PathLike, shuffle_choices_seed: int | None = 0,
                  use_task_prefix: bool = True) -> list[MCExample]:
  """BIG-bench task.json -> MCExamples; skips (and logs) examples without one best choice.

  The correct choice is the unique one with the highest score > 0. Many tasks list the correct
  choice first, so choices are shuffled per example with rng([shuffle_choices_seed, index])
  (None keeps the file's order). A `task_prefix` is put on its own line before each input.
  """
  path, examples, name, prefix = _read_bigbench(task_json_path, use_task_prefix)
  out, skipped = [], 0
  for i, ex in enumerate(examples):
    gold = _gold_choice(ex)
    if gold is None:
      skipped += 1
      continue
    choices, label = gold
    if shuffle_choices_seed is not None:
      perm = np.random.default_rng([shuffle_choices_seed, i]).permutation(len(choices))
      choices, label = [choices[j] for j in perm], int(np.flatnonzero(perm == label)[0])
    text = f"{prefix}\n{ex['input']}" if prefix else str(ex["input"])
    out.append(MCExample(text, choices, label, name))
  if skipped:
    log.warning("%s: skipped %d of %d examples without exactly one correct choice",
                path, skipped, len(examples))
  return out


def load_bigbench_text(task_json_path: str | os.PathLike, answer_template: str = "{answer}",
                       use_task_prefix: bool = True, on_bad: str = "error") -> list[TextExample]:
  """BIG-bench task.json -> TextExample(input, answer_template.format(answer=gold)).

  The gold answer: with "target_scores", the choice `load_bigbench` would mark correct (the unique
  best score > 0 of >= 2 choices; an example with "target_scores" but no such choice is bad even
  if it has a "target"), so a template such as "Sentiment: {answer}" phrases a classification task
  as text over the same examples and answers as its choice run; else "target" (a string, or a
  list whose first entry is used). The template applies to both kinds. A `task_prefix` is put on
  its own line before each input, as in `load_bigbench`. Bad examples (neither kind; a blank
  input or answer) follow `on_bad`; unlike here, `load_bigbench` keeps blank inputs.
  """
  path, examples, _, prefix = _read_bigbench(task_json_path, use_task_prefix)
  bad = _BadRecords(path, on_bad)  # Checks on_bad before anything else can fail.
  try:
    probe = answer_template.format(answer="\0")
  except (KeyError, IndexError, ValueError, AttributeError) as e:
    raise UserError(f"data.answer_template {answer_template!r}: expected only an {{answer}} field "
                    f"({type(e).__name__}: {e})") from None
  if "\0" not in probe:
    raise UserError(f"data.answer_template {answer_template!r}: expected an {{answer}} field")
  out = []
  for i, ex in enumerate(examples):
    if not isinstance(ex, dict):
      bad(f"record {i}: expected an object with 'input' and 'target' or 'target_scores', got "
          f"{type(ex).__name__}")
      continue
    prompt = _text(ex.get("input"))
    if prompt is None:
      bad(_expected(f"record {i}: field", "input", ex.get("input")))
      continue
    if "target_scores" in ex:
      gold = _gold_choice(ex)
      if gold is None:
        bad(f"record {i}: field 'target_scores': expected >= 2 choices with exactly one best "
            "score > 0")
        continue
      answer, field = _text(gold[0][gold[1]]), "target_scores"
    elif "target" in ex:
      target = ex["target"]
      answer = _text(target[0] if isinstance(target, list) and target else target)
      field = "target"
    else:
      bad(f"record {i}: expected a 'target' or 'target_scores' field (has {sorted(ex)})")
      continue
    if answer is None:
      bad(_expected(f"record {i}: field", field, ex[field]))
      continue
    out.append(TextExample(f"{prefix}\n{prompt}" if prefix else prompt,
                           answer_template.format(answer=answer)))
  bad.log(len(examples))
  return out


# VADER (Hutto & Gilbert 2014): four domains of sentences, each rated -4..+4 by ~20 people.
VADER_DOMAINS = {"tweets": "tweets", "movie_reviews": "movieReviewSnippets",
                 "amazon_reviews": "amazonReviewSnippets", "nyt_editorials": "nytEditorialSnippets"}
VADER_CHOICES = ("negative", "neutral", "positive")
VADER_QUESTION = "Text: {text}\nWhat is the sentiment of this text?"


@functools.lru_cache(maxsize=4)
def _vader_files(archive: str) -> dict[str, str]:
  """{member basename: its UTF-8 text (a leading byte-order mark dropped)} of a VADER archive."""
  try:
    with tarfile.open(archive) as tf:
      return {os.path.basename(m.name): tf.extractfile(m).read().decode("utf-8-sig")
              for m in tf.getmembers()
              if m.isfile() and m.name.endswith(("_GroundTruth.txt", "_anonDataRatings.txt"))}
  except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
    raise UserError(f"{archive}: expected VADER's data archive ({type(e).__name__}: {e})"
                    ) from None


def _vader_rows(text: str, where: str, fields: int) -> dict[str, list[str]]:
  rows = {}
  for n, line in enumerate(text.splitlines(), 1):
    if line.strip():
      cols = line.rstrip("\n").split("\t")
      if len(cols) < fields:
        raise UserError(f"{where}: line {n}: expected {fields} tab-separated fields, got "
                        f"{len(cols)}")
      rows[cols[0].strip()] = cols
  return rows


def vader_class(valence: float | np.ndarray, neutral_band: float) -> np.ndarray:
  """-4..+4 valence -> 0 negative (< -band), 1 neutral (within the band), 2 positive (> band)."""
  v = np.asarray(valence, np.float64)
  return np.where(v < -neutral_band, 0, np.where(v > neutral_band, 2, 1))


def load_vader(domain: str, neutral_band: float = 0.5,
               archive: str | os.PathLike | None = None) -> list[MCExample]:
  """One VADER domain -> 3-way MCExamples (negative / neutral / positive), in the file's order.

  The label is `vader_class` of the sentence's mean rating (its GroundTruth file); `human` is
  the share of its raters (anonDataRatings, joined by id) whose own rating falls in each class
  under the same rule. The question is VADER_QUESTION with HTML entities of the text unescaped
  (the tweets' "&amp;"). `archive`: a tar of the data files, by default the copy embedded in
  the package (first_jax/embedded/README.md: source, licence, checksums).
  """
  if domain not in VADER_DOMAINS:
    raise UserError(f"data.task {domain!r}: expected a VADER domain, one of "
                    f"{sorted(VADER_DOMAINS)}")
  if not neutral_band >= 0:
    raise UserError(f"data.neutral_band: expected >= 0, got {neutral_band}")
  if archive is None:
    from first_jax import embedded  # the package's own copy
    archive = embedded.VADER
  files = _vader_files(os.fspath(archive))
  name = VADER_DOMAINS[domain]
  texts = {}
  for kind in ("GroundTruth", "anonDataRatings"):
    member = f"{name}_{kind}.txt"
    if member not in files:
      raise UserError(f"{archive}: has no {member}")
    texts[kind] = _vader_rows(files[member], f"{archive}:{member}", 3 if kind[0] == "G" else 4)
  out = []
  for key, (_, mean, sentence, *_) in texts["GroundTruth"].items():
    rated = texts["anonDataRatings"].get(key)
    if rated is None:
      raise UserError(f"{archive}:{name}_anonDataRatings.txt: no ratings for id {key!r}")
    try:
      valence = float(mean)
      ratings = json.loads(rated[3])
      votes = np.bincount(vader_class(ratings, neutral_band), minlength=3)
      if not votes.sum():
        raise ValueError("no ratings")
    except (ValueError, TypeError) as e:
      raise UserError(f"{archive}:{name}: id {key!r}: expected a number and a list of "
                      f"ratings ({e})") from None
    out.append(MCExample(VADER_QUESTION.format(text=html.unescape(sentence.strip())),
                         list(VADER_CHOICES), int(vader_class(valence, neutral_band)),
                         f"vader/{domain}", tuple(float(x) for x in votes / votes.sum())))
  return out


# OpenAI's evals registry (PyPI `evals`): JSON lines {"input": [chat messages], "ideal": answer}.
# Multiple-choice questions list their options at the end of the last message, on lines
# ("...\n\n A: more\n B: less") or inline ("... A: x; B: y; C: z.").
_OPTION = re.compile(r"(?:^|(?<=\s))([A-Z])[:)]\s+")
# ... or as lettered lines "A. x" (LogiQA), the last message ending in an "Answer:" cue.
_LINE_OPTION = re.compile(r"(?m)^[ \t]*([A-Z])\.[ \t]*")
_ANSWER_CUE = re.compile(r"\s*Answer:\s*$")


def _read_evals(path: str | os.PathLike, bad: "_BadRecords"
                ) -> tuple[list[tuple[int, list, str]], int]:
  """-> ([(line number, messages, ideal answer)], number of records) of an evals JSON-lines
  file; bad lines go to `bad`. Lines without "input" (the few-shot files' "sample" lines) are
  bad too."""
  path = os.fspath(path)
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = list(f)
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: expected a readable evals JSON-lines file ({e})") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except ValueError as e:
      bad(f"line {n}: not JSON ({e})")
      continue
    msgs = rec.get("input") if isinstance(rec, dict) else None
    ideal = rec.get("ideal") if isinstance(rec, dict) else None
    ideal = ideal[0] if isinstance(ideal, list) and ideal else ideal
    if (not isinstance(msgs, list) or not msgs
        or not all(isinstance(m, dict) and _text(m.get("content")) for m in msgs)):
      bad(f"line {n}: field 'input': expected a list of chat messages with text 'content'")
      continue
    if _text(ideal) is None:
      bad(_expected(f"line {n}: field", "ideal", ideal))
      continue
    out.append((n, msgs, str(ideal).strip()))
  if not out and not bad.count:
    raise UserError(f"{path}: no records (expected JSON lines with 'input' and 'ideal')")
  return out, sum(1 for line in lines if line.strip())


def _split_options(text: str) -> tuple[str, list[str]] | None:
  """"question A: x; B: y" -> ("question", ["x", "y"]): the last run of options A, B, ... at
  the end of `text` (at least two), each stripped of its trailing ";", "," or "."; failing
  that, lettered lines "A. x" before an optional final "Answer:" (a choice repeating its own
  letter, "A. A.x", loses the repeat)."""
  found = _option_run(text, _OPTION)
  if found is None:
    found = _option_run(_ANSWER_CUE.sub("", text), _LINE_OPTION, repeated_letter=True)
  return found


def _option_run(text: str, pattern: re.Pattern, repeated_letter: bool = False
                ) -> tuple[str, list[str]] | None:
  marks = list(pattern.finditer(text))
  for start in (i for i, m in enumerate(marks) if m.group(1) == "A"):
    run = [marks[start]]
    for m in marks[start + 1:]:
      if ord(m.group(1)) == ord(run[-1].group(1)) + 1:
        run.append(m)
    if len(run) < 2 or len(run) != len(marks) - start:
      continue  # an "A:" inside the question, or letters out of order: try the next "A:"
    ends = [m.start() for m in run[1:]] + [len(text)]
    choices = [text[m.end():e].strip() for m, e in zip(run, ends)]
    if repeated_letter:  # "A. A.Zhao" -> "Zhao"
      choices = [re.sub(rf"^{m.group(1)}\.\s*", "", c) for m, c in zip(run, choices)]
    choices = [c.rstrip(";,.").strip() for c in choices]
    if all(choices):
      return text[:run[0].start()].strip(), choices
  return None


def load_evals(path: str | os.PathLike, on_bad: str = "error") -> list[MCExample]:
  """An evals multiple-choice file -> MCExamples: the last message's question and options
  (`_split_options`), the gold choice the `ideal` letter. Earlier messages (the system's "answer
  with the letter" instruction) are dropped: the run's own template asks the question."""
  bad = _BadRecords(os.fspath(path), on_bad)
  name = os.path.basename(os.path.dirname(os.path.abspath(path)))
  out = []
  records, total = _read_evals(path, bad)
  for n, msgs, ideal in records:
    split = _split_options(str(msgs[-1]["content"]))
    if split is None:
      bad(f"line {n}: expected options 'A: ...', 'B: ...' at the end of the last message")
      continue
    question, choices = split
    if len(ideal) != 1 or not "A" <= ideal <= LETTERS[len(choices) - 1]:
      bad(f"line {n}: field 'ideal': expected one of the letters A..{LETTERS[len(choices) - 1]}, "
          f"got {ideal!r}")
      continue
    out.append(MCExample(question, choices, LETTERS.index(ideal), name))
  bad.log(total)
  return out


def load_evals_text(path: str | os.PathLike, on_bad: str = "error") -> list[TextExample]:
  """An evals file -> TextExamples: the prompt is every message's content, joined by blank
  lines (system instruction first); the response is `ideal` (its first entry if a list)."""
  bad = _BadRecords(os.fspath(path), on_bad)
  records, total = _read_evals(path, bad)
  out = [TextExample("\n\n".join(str(m["content"]).strip() for m in msgs), ideal)
         for _, msgs, ideal in records]
  bad.log(total)
  return out


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_dataset(path_or_name: str, split: str,
                  data_files: str | list[str] | Mapping[str, Any] | None, name: str | None,
                  cache_dir: str | None) -> tuple[Any, str, str]:
  """-> (the `datasets.Dataset` split, its source: the data file's basename, else the name,
  and where its records are for messages: the (first) data file's path, else the name).

  `path_or_name`: "json" / "parquet" / "csv" with local `data_files`, a local data file, or a hub
  name. Local files are put under `split`, so any split name works for them.
  """
  import datasets  # Heavy; only needed for these sources.

  builder = path_or_name
  if data_files is None and not os.path.exists(path_or_name) and _looks_like_a_file(path_or_name):
    raise UserError(f"{path_or_name}: file not found (expected a local .json, .jsonl, .parquet "
                    f"or .csv file, or a hub dataset name)")
  if data_files is None and os.path.isfile(path_or_name):
    builder, data_files = _BUILDERS.get(os.path.splitext(path_or_name)[1], ""), path_or_name
    if not builder:
      raise UserError(f"{path_or_name}: expected a .json, .jsonl, .parquet or .csv file")
  if isinstance(data_files, (str, os.PathLike, list, tuple)):
    data_files = {split: data_files}  # So any split name works for plain local files.
  first = (data_files.get(split) or next(iter(data_files.values()), None)) if data_files else None
  first = first[0] if isinstance(first, (list, tuple)) and first else first
  local = builder in _BUILDERS.values() and bool(first)
  where = os.fspath(first) if local else path_or_name
  source = os.path.basename(where) if local else path_or_name
  if local and os.path.isfile(where):
    _check_text_file(where, builder)
  try:
    ds = datasets.load_dataset(builder, name=name, split=split, data_files=data_files,
                               cache_dir=cache_dir)
  except Exception as e:  # Anything here is a bad name, file or split given by the user.
    cause = e.__cause__ or e.__context__ or e  # e.g. the JSON parser's message and row
    msg = str(cause).splitlines()[0] if str(cause) else ""
    raise UserError(f"{where}: could not load split {split!r} ({type(cause).__name__}: "
                    f"{msg})") from None
  if len(ds) == 0:
    raise UserError(f"{where}: split {split!r} has no rows")
  return ds, source, where


def _looks_like_a_file(name: str) -> bool:
  """A path rather than a hub name ("org/name"): absolute or relative to here, or a file
  extension."""
  return (name.startswith(("/", "./", "../", "~"))
          or os.path.splitext(name)[1].lower() in (*_BUILDERS, ".txt", ".tsv", ".gz", ".zip"))


def _check_text_file(path: str, builder: str) -> None:
  """A local data file is not empty, and a text one (JSON, JSON lines, CSV) is UTF-8."""
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: empty file (expected rows of data)")
  if builder == "parquet":
    return
  decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      try:
        decoder.decode(chunk)
      except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (near byte {offset + e.start}: {e.reason})"
                        ) from None
      offset += len(chunk)
  try:
    decoder.decode(b"", final=True)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text (it ends inside a character: {e.reason})") from None


def _parse_label(value: Any, choices: Sequence[str], letters: str) -> int:
  """int (or digit string) -> index; one letter of `letters` -> its index; a list of one score
  per choice (BIG-bench's multiple_choice_scores) -> the unique best score > 0; else a choice's
  text."""
  if isinstance(value, (list, tuple)) and len(value) == len(choices) and len(value) >= 2:
    try:
      scores = [float(v) for v in value]
    except (TypeError, ValueError):
      raise ValueError(f"label {value!r}: expected one number per choice") from None
    best = max(scores)
    if best <= 0 or scores.count(best) != 1:
      raise ValueError(f"label scores {value!r}: expected exactly one best score > 0")
    return scores.index(best)
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
  name (`name`: its configuration, e.g. a BIG-bench task of "google/bigbench"). `choices` is a
  list column, a {"text": [...]} column, or a list of columns (one per choice). Label rule: an
  int (or digit string) is an index; a single letter of `letters` is a letter; a list of scores,
  one per choice, picks the unique best > 0 (BIG-bench on the hub: fields input="inputs",
  choices="multiple_choice_targets", label="multiple_choice_scores"); any other string must
  equal one choice's text.
  """
  missing = {"input", "choices", "label"} - set(fields)
  if missing:
    raise UserError(f"data.hf_fields: missing {sorted(missing)} (need input, choices, label)")
  ds, source, _ = _load_dataset(path_or_name, split, data_files, name, cache_dir)
  ccol = fields["choices"]
  cols = [fields["input"], fields["label"]] + (list(ccol) if isinstance(ccol, list) else [ccol])
  for c in cols:
    if c not in ds.column_names:
      raise UserError(f"data.hf_fields: column {c!r} not in {path_or_name} "
                      f"(has {ds.column_names})")
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


def load_hf_text(path_or_name: str, split: str, fields: Mapping[str, Any],
                 data_files: str | list[str] | Mapping[str, Any] | None = None, *,
                 name: str | None = None, cache_dir: str | None = None,
                 on_bad: str = "error") -> list[TextExample]:
  """A `datasets` dataset -> TextExamples via `fields` = {prompt: col, context: col, response: col}.

  Datasets as in `load_hf` (so Alpaca JSON lines or its JSON list work as a local file, with
  fields instruction / input / output). The prompt is the prompt column, plus "\\n\\n" + the
  context column's value when that column exists and the row's value is not blank (a missing
  context column, or a None / absent "context" field, is fine). A missing prompt or response
  column is a UserError; rows with a blank or non-string prompt or response follow `on_bad`.
  """
  missing = {"prompt", "response"} - {k for k, v in fields.items() if v}
  if missing:
    raise UserError(f"data.text_fields: missing {sorted(missing)} (need prompt, response and "
                    "optionally context)")
  bad = _BadRecords(path_or_name, on_bad)
  ds, _, bad.where = _load_dataset(path_or_name, split, data_files, name, cache_dir)
  pcol, rcol, ccol = fields["prompt"], fields["response"], fields.get("context")
  for c in (pcol, rcol):
    if c not in ds.column_names:
      raise UserError(f"data.text_fields: column {c!r} not in {path_or_name} "
                      f"(has {ds.column_names})")
  ccol = ccol if ccol in ds.column_names else None
  out = []
  for i, row in enumerate(ds):
    prompt, response = _text(row[pcol]), _text(row[rcol])
    if prompt is None or response is None:
      col = pcol if prompt is None else rcol
      bad(_expected(f"row {i}: column", col, row[col]))
      continue
    context = row[ccol] if ccol else None
    if context is not None and not isinstance(context, (str, int, float, bool, np.generic)):
      bad(f"row {i}: column {ccol!r}: expected a string or nothing, got {type(context).__name__}")
      continue
    context = _text(context) if context is not None else None
    out.append(TextExample(prompt + (f"\n\n{context.strip()}" if context else ""), response))
  bad.log(len(ds))
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
