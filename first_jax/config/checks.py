"""Validation: every key against `SCHEMA` (unknown keys, types, allowed values, ranges), then
the rules that tie keys together. Every failure is a `UserError` naming the key."""
from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from first_jax.runtime.errors import UserError
from first_jax.config.schema import _default_type, _expected, _get, _MISSING, leaves, SCHEMA, type_name


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
  if not ok:
    raise UserError(f"config.{key}: expected {expected}, got {got!r}")


# Names that `first_jax.assets` fetches instead of a local path.
MODEL_ASSETS = ("smollm2",)
TOKENIZER_ASSETS = ("gpt2", "smollm2")


def _check_model_source(cfg: ml_collections.ConfigDict, who: str, check_paths: bool) -> None:
  block = cfg[who]  # `init` itself is checked against the schema
  if block.init == "layer_subset":  # layers of the pre-trained teacher
    _require(who == "student" and cfg.teacher.init == "pretrained", f"{who}.init",
             "layer_subset only for the student of a pre-trained teacher", block.init)
    return
  if check_paths and block.init != "random" and block.path not in MODEL_ASSETS:
    _require(os.path.exists(block.path), f"{who}.path", _expected(f"{who}.path"), block.path)
    from first_jax.models import hf_io  # its config read and checked, no weights loaded
    try:
      hf_io.check_pretrained(block.path)
    except UserError as e:
      raise UserError(f"config.{who}.path: {e}") from None


def validate(cfg: ml_collections.ConfigDict, check_paths: bool = True) -> None:
  """Start-up checks of the values every stage relies on (one clear line each).

  First every key against `SCHEMA` (`check_keys`: unknown keys, types, allowed values, ranges),
  then the rules that tie keys together or need the outside world (device count, vocabulary,
  split fractions, text-only rules, files). `check_paths=False` skips the existence of data,
  tokenizer and model files (for planning a run on another machine).
  """
  import jax  # local: keep `--help`-style failures fast

  check_keys(cfg)
  mesh = cfg.mesh
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]  # each: a size >= 1 or -1 (schema)
  _require(sizes.count(-1) <= 1, "mesh", "at most one axis of size -1", sizes)
  n = jax.device_count()
  fixed = 1
  for s in sizes:
    fixed *= 1 if s == -1 else s
  if -1 in sizes:
    _require(n % fixed == 0, "mesh", f"sizes whose product divides the {n} devices", sizes)
  else:
    _require(fixed == n, "mesh", f"data*fsdp*tensor == {n} devices", sizes)

  k = cfg.extract.k
  vocab = cfg.teacher.model.vocab_size if "model" in cfg.teacher else None
  if vocab:
    _require(k <= vocab, "extract.k", f"<= the vocabulary size {vocab}", k)
  t = cfg.distill.temperature
  if t not in ("calibrated", "search"):
    try:
      ok = math.isfinite(float(t)) and float(t) > 0
    except (TypeError, ValueError):
      ok = False
    _require(ok, "distill.temperature", _expected("distill.temperature"), t)
  if "model" in cfg.student and cfg.student.init == cfg.teacher.init == "random":
    _require(cfg.student.model.vocab_size == cfg.teacher.model.vocab_size,
             "student.model.vocab_size", f"the teacher's vocabulary size "
             f"{cfg.teacher.model.vocab_size} (the top-k ids index both)",
             cfg.student.model.vocab_size)
  d = cfg.distill
  _require(0 <= d.search_min_events <= d.search_events, "distill.search_min_events",
           "0 <= value <= distill.search_events", d.search_min_events)
  for name in ("finetune", "distill"):
    buckets = cfg[name].length_buckets
    _require(all(isinstance(b, int) and 2 <= b <= cfg.data.max_len for b in buckets),
             f"{name}.length_buckets", f"lengths between 2 and data.max_len ({cfg.data.max_len})",
             buckets)
  split = cfg.data.validation + cfg.data.test
  _require(cfg.data.validation > 0 and cfg.data.test > 0 and split < 1, "data.validation",
           "validation and test fractions > 0 summing to < 1", (cfg.data.validation, cfg.data.test))
  _require("{answer}" in cfg.data.answer_template, "data.answer_template",
           _expected("data.answer_template"), cfg.data.answer_template)
  g = tuple(cfg.evaluate.post_hoc_grid)
  _require(len(g) == 3 and all(isinstance(x, (int, float)) for x in g) and 0 < g[0] < g[1]
           and int(g[2]) == g[2] >= 2, "evaluate.post_hoc_grid",
           _expected("evaluate.post_hoc_grid"), cfg.evaluate.post_hoc_grid)
  if cfg.data.kind == "text":
    _require(cfg.data.loss_on == "response", "data.loss_on",
             "response for data.kind=text (prompt tokens are never distilled)", cfg.data.loss_on)
    bad = [s for s in cfg.students if s.partition("@")[0] == "sft_ls-choices"]
    _require(not bad, "students", "no sft_ls-choices for data.kind=text (no answer letters)",
             bad)
  else:
    _require(not cfg.evaluate.choice_tasks, "evaluate.choice_tasks",
             "() for data.kind=choice (its own task is the choice task)",
             cfg.evaluate.choice_tasks)
  looks_local = cfg.data.task.endswith((".json", ".jsonl", ".parquet", ".csv"))
  if check_paths and cfg.data.source in ("bigbench", "hf") and looks_local:
    _require(os.path.exists(cfg.data.task), "data.task", "an existing data file", cfg.data.task)
  if check_paths and cfg.tokenizer not in TOKENIZER_ASSETS and not os.path.exists(cfg.tokenizer):
    raise UserError(f"config.tokenizer: expected an existing tokenizer dir/file or an asset "
                    f"name (gpt2, smollm2), got {cfg.tokenizer!r}")
  for who in ("teacher", "student"):
    _check_model_source(cfg, who, check_paths)
  if cfg.teacher.source == "server":
    _check_served(cfg)
  for path in cfg.evaluate.models if check_paths else ():
    _require(os.path.exists(path), "evaluate.models", _expected("evaluate.models"), path)


def _check_served(cfg: ml_collections.ConfigDict) -> None:
  """A served teacher gives top-k log-probs at T = 1 and nothing else."""
  s = cfg.teacher.server
  _require(s.url.startswith(("http://", "https://")), "teacher.server.url",
           _expected("teacher.server.url"), s.url)
  _require(bool(s.model), "teacher.server.model", _expected("teacher.server.model"), s.model)
  _require(cfg.distill.mode == "offline", "distill.mode",
           "offline with teacher.source=server (the online step runs the teacher in process)",
           cfg.distill.mode)
  full = [n for n in cfg.students if n.partition("@")[0] == "full_kd"
          or "sampled" in n.partition("@")[0].split("-")]
  _require(not full, "students", "no full_kd, kd-sampled or first-sampled with "
           "teacher.source=server (they need the teacher's full distribution; a server gives "
           "its top-k)", full)


def _is_type(value: Any, kind: type) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, kind)


def _type_ok(key: str, value: Any) -> bool:
  spec = SCHEMA[key]
  if spec.types:
    return any(_is_type(value, t) for t in spec.types)
  kind = _default_type(key)
  if kind is tuple:
    return isinstance(value, (tuple, list)) and (
        spec.item is None or all(_is_type(v, spec.item) for v in value))
  return _is_type(value, kind)


def _in_range(spec: "Key", x: Any) -> bool:
  if x in spec.also and not isinstance(x, bool):
    return True
  if spec.finite and not math.isfinite(x):
    return False
  if spec.lo is not None and not (x > spec.lo if spec.lo_open else x >= spec.lo):
    return False
  if spec.hi is not None and not (x < spec.hi if spec.hi_open else x <= spec.hi):
    return False
  return not (isinstance(x, float) and math.isnan(x))


def check_key(key: str, value: Any) -> None:
  """One key against its schema entry: type, then allowed values / range (UserError)."""
  spec = SCHEMA[key]
  _require(_type_ok(key, value), key, type_name(key), value)
  items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if isinstance(value, (tuple, list)):
    _require(len(items) >= spec.min_len, key, spec.expected(key), value)
  if spec.choices:
    _require(all(v in spec.choices for v in items), key, spec.expected(key), value)
  if spec.has_range:
    _require(all(_in_range(spec, v) for v in items), key, spec.expected(key), value)


def check_keys(cfg: ml_collections.ConfigDict) -> None:
  """Every key of `cfg` is a key of `base()`, of its type and in its allowed values / range."""
  for key in leaves(cfg):
    if key not in SCHEMA:
      raise UserError(f"config.{key}: unknown key (not in first_jax.config.base(); see "
                      f"docs/config.md)")
  for key in SCHEMA:
    value = _get(cfg, key)
    if value is not _MISSING:
      check_key(key, value)
