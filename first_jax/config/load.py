"""Loading: a Python config file (`get_config(arg)`), `--config.a.b=v` overrides typed by the
default they replace, validation; the result is locked."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from first_jax.runtime.errors import UserError
from first_jax.config.schema import SCHEMA, type_name
from first_jax.config.checks import _is_type, validate


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: file not found (expected a Python file defining get_config)")
  module_spec = importlib.util.spec_from_file_location("_first_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise UserError(f"--config {path}: defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
  except UserError:
    raise
  except Exception as e:  # the config file's own error, as one line naming the file and line
    text = e.msg if isinstance(e, SyntaxError) else str(e)
    raise UserError(f"--config {path}: {_where_in(e, path)}{type(e).__name__}: "
                    f"{(text.strip().splitlines() or [''])[0]}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def _where_in(e: BaseException, path: str) -> str:
  """"line N: " of the innermost frame of `e` in the file `path` (or its syntax error)."""
  if isinstance(e, SyntaxError) and e.lineno and e.filename == path:
    return f"line {e.lineno}: "
  line, tb = None, e.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  return "" if line is None else f"line {line}: "


def _parse_value(key: str, text: str, default: Any) -> Any:
  """Parses `text` into the type of `default`."""
  kind = type(default)
  try:
    if isinstance(default, bool):
      if text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise ValueError
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
    if isinstance(default, (tuple, list)):
      return kind(_parse_sequence(key, text))
    if default is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
  except (ValueError, SyntaxError):
    pass
  name = type_name(key) if key in SCHEMA else kind.__name__
  raise UserError(f"config.{key}: expected {name}, got {text!r}")


def _item_type(key: str) -> type | None:
  spec = SCHEMA.get(key)
  return spec.item if spec is not None else None


def _parse_sequence(key: str, text: str) -> tuple:
  """A tuple from `(a, b)` / `[a, b]` (a Python literal) or `a,b` (a comma list: strings, or
  numbers where the key holds numbers); an empty text or `()` is the empty tuple."""
  item = _item_type(key)
  body = text.strip()
  if body[:1] in ("(", "["):
    value = ast.literal_eval(body)
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  else:
    parts = _split_commas(body)
    if parts and not parts[-1]:  # a trailing comma: `a,`
      parts = parts[:-1]
    value = tuple(_parse_item(p, item) for p in parts) if body else ()
  if item is not None and not all(_is_type(v, item) for v in value):
    raise ValueError
  return value


def _split_commas(text: str) -> list[str]:
  """`a, 'b,c', d` -> ["a", "'b,c'", "d"]: commas inside quotes do not split."""
  parts, quote, start = [], None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == ",":
      parts.append(text[start:i].strip())
      start = i + 1
  return parts + [text[start:].strip()]


def _parse_item(text: str, item: type | None) -> Any:
  if text[:1] in ("'", '"'):
    return ast.literal_eval(text)
  if item is str:
    return text
  if item is int:
    return int(text)
  try:  # float items keep ints as ints (a count in a grid); no declared type: best guess
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if item is not None:
      raise
    return text
  return value


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets cfg.<dotted> from command-line text, typed by its current value."""
  node = cfg
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    where = ".".join(parts[: i + 1])
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(["config"] + parts[:i])
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise UserError(f"config.{where}: unknown key (keys of {parent}: {known})")
    if i < len(parts) - 1:
      node = node[part]
  default = node[parts[-1]]
  if isinstance(default, ml_collections.ConfigDict):
    raise UserError(f"config.{dotted}: is a block, set one of its keys instead")
  with node.unlocked():
    node[parts[-1]] = _parse_value(dotted, text, default)


def parse_argv(argv: Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
  """Splits argv into the config spec and (dotted key, text) overrides."""
  spec, overrides = None, []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    if a in ("--config", "-c"):
      if i + 1 >= len(args):
        raise UserError("--config: expected a path to a config file")
      spec, i = args[i + 1], i + 2
      continue
    if a.startswith("--config="):
      spec, i = a.split("=", 1)[1], i + 1
      continue
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" in body:
        key, text = body.split("=", 1)
        i += 1
      elif i + 1 < len(args):
        key, text, i = body, args[i + 1], i + 2
      else:
        raise UserError(f"--config.{body}: expected a value")
      overrides.append((key, text))
      continue
    raise UserError(f"{a}: unknown argument (expected --config FILE and --config.key=value)")
  if spec is None:
    raise UserError("--config: required (e.g. --config configs/smoke.py)")
  return spec, overrides


def load(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """Loads, overrides, validates and locks a config from command-line arguments."""
  spec, overrides = parse_argv(argv)
  cfg = load_file(spec)
  for key, text in overrides:
    apply_override(cfg, key, text)
  validate(cfg)
  cfg.lock()
  return cfg
