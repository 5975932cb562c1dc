"""Loading: `ml_collections.config_flags` parses the command line, a Python config file
(`get_config(arg)`) and `--config.a.b=v` overrides typed by the default they replace; then
validation; the result is locked."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from first_jax.runtime.errors import UserError
from first_jax.config.schema import BLOCKS, SCHEMA, base, type_name
from first_jax.config.checks import _is_type, validate


# bool words the command line takes, as config_flags' bool parser reads them
_BOOL_WORDS = {**dict.fromkeys(("true", "1", "yes", "on"), "true"),
               **dict.fromkeys(("false", "0", "no", "off"), "false")}


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


_PROG = "first_jax"
_UNKNOWN = "unknown argument (expected --config FILE and --config.key=value)"


class _FileParser(flags.ArgumentParser):
  """`--config FILE[:ARG]` for config_flags: `load_file`, so that a bad file is one line."""

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    return load_file(argument)

  def flag_type(self) -> str:
    return "config file"


def _canonical(argv: Sequence[str]) -> list[str]:
  """argv with each override in the form config_flags parses (`--config.KEY=VALUE`), its value
  written as config_flags types it: our comma lists as tuple literals (typed by the key's
  `SCHEMA` entry), bool words as true/false. A block, or an override without a value, is
  refused here with its one line; unknown keys are left to config_flags (and `_diagnose`).
  The config file comes first (config_flags reads overrides only after it)."""
  head, out, overrides, args, i = [], [], {}, list(argv), 0
  while i < len(args):
    a = args[i]
    if a in ("--config", "-c") and i + 1 < len(args):  # (-c: its short name) first, always
      head, i = ["--config", args[i + 1]], i + 2
      continue
    if a.startswith("--config="):
      head, i = [a], i + 1
      continue
    if not a.startswith("--config."):
      out.append(a)
      i += 1
      continue
    body = a[len("--config."):]
    if "=" in body:
      key, text = body.split("=", 1)
      i += 1
    elif i + 1 < len(args):
      key, text, i = body, args[i + 1], i + 2
    else:
      raise UserError(f"--config.{body}: expected a value")
    if key in BLOCKS:
      raise UserError(f"config.{key}: is a block, set one of its keys instead")
    spec = SCHEMA.get(key)
    if spec is not None and isinstance(spec.default, tuple):
      try:
        text = repr(_parse_sequence(key, text))
      except (ValueError, SyntaxError):
        raise UserError(f"config.{key}: expected {type_name(key)}, got {text!r}") from None
    elif spec is not None and isinstance(spec.default, bool):
      text = _BOOL_WORDS.get(text.lower(), text)
    overrides.pop(key, None)  # a key set twice: the last value, as config_flags keeps it
    overrides[key] = f"--config.{key}={text}"
  return head + out + list(overrides.values())


def _diagnose(key: str) -> None:
  """The one line for an override config_flags could not place: an unknown key (naming the
  keys of the block it is not in; every config has the keys of `base()`, `validate` checks)."""
  node, parts = base(), key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(["config"] + parts[:i])
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
      raise UserError(f"config.{'.'.join(parts[: i + 1])}: unknown key (keys of {parent}: "
                      f"{known})")
    node = node[part]


def parse(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The config of a command line, unvalidated: `ml_collections.config_flags` reads
  `--config FILE[:ARG]` (through `load_file`) and applies the `--config.KEY=VALUE` overrides in
  order (after `_canonical`), each typed by the value it replaces; anything config_flags refuses
  becomes one line naming the argument or key."""
  argv = [_PROG] + _canonical(argv)
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=False,
                                           sys_argv=argv)
  fv["config"].parser = _FileParser()
  overrides = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
  try:
    rest = fv(argv)
  except flags.UnrecognizedFlagError as e:
    raise UserError(f"--{e.flagname}: {_UNKNOWN}") from None
  except flags.IllegalFlagValueError as e:
    flag, _, text = str(e).partition(": ")[0].removeprefix("flag --config.").partition("=")
    name = type_name(flag) if flag in SCHEMA else "a value of the key's type"
    raise UserError(f"config.{flag}: expected {name}, got {text!r}") from None
  except (AttributeError, KeyError):  # an override of a key the config does not have
    for key in overrides:
      _diagnose(key)
    raise
  except flags.Error as e:  # anything else config_flags refuses, as one line
    raise UserError((str(e).splitlines() or [type(e).__name__])[0]) from None
  if len(rest) > 1:
    raise UserError(f"{rest[1]}: {_UNKNOWN}")
  if holder.value is None:
    raise UserError("--config: required (e.g. --config configs/smoke.py)")
  return holder.value


def load(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """Loads (`parse`), validates and locks a config from command-line arguments."""
  cfg = parse(argv)
  validate(cfg)
  cfg.lock()
  return cfg
