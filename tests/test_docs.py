"""The user docs match the code: generated config reference, commands, config keys, --help."""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from first_jax import cli, config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# `--config.a.b=value` and friends stand for any key
PLACEHOLDERS = {"a.b", "a.b.c", "key", "KEY"}
# `data.py`, `evaluate.py`: files named like a config block
FILE_SUFFIXES = ("py", "json", "jsonl", "md", "png", "npz", "sh", "csv", "parquet", "gguf", "bin",
                 "txt", "yaml", "safetensors")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _where(path, text, pos):
  return f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, pos) + 1}"


def _exists(key, leaf_only=False):
  node = config_lib.base()
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return not (leaf_only and hasattr(node, "keys"))


def test_config_reference_is_up_to_date():
  path = os.path.join(ROOT, "docs", "config.md")
  assert os.path.exists(path) and _read(path) == config_lib.markdown(), (
      "docs/config.md is stale: run `python -m first_jax.config --markdown` from the repository "
      "root")


# modules of the optional extras (pyproject.toml), not installed by the test command
OPTIONAL_EXTRAS = ("llama_cpp",)


def test_python_m_commands_name_existing_modules():
  sys.path.insert(0, ROOT)  # bench.* and the like, run from the repository root
  try:
    bad, seen = [], 0
    for path in DOCS:
      text = _read(path)
      for m in re.finditer(r"python3? -m ([A-Za-z_][\w.]*(?:<stage>)?)", text):
        name = m.group(1).rstrip(".")
        names = ([name.replace("<stage>", s) for s in cli.STAGES] if "<stage>" in name
                 else [name])
        for n in names:
          if n.split(".")[0] in OPTIONAL_EXTRAS:  # a module of an optional extra
            continue
          seen += 1
          try:
            found = importlib.util.find_spec(n) is not None
          except (ImportError, ValueError):
            found = False
          if not found:
            bad.append(f"{_where(path, text, m.start())}: python -m {n}")
    assert seen, "no `python -m` commands found"
    assert not bad, "docs name modules that do not exist:\n" + "\n".join(bad)
  finally:
    sys.path.remove(ROOT)


def _without_error_examples(text):
  """The text with its `<!-- errors -->` blocks blanked (they show mistakes on purpose)."""
  return re.sub(r"<!-- errors -->\s*```.*?```", lambda m: " " * len(m.group(0)), text,
                flags=re.S)


def test_config_overrides_in_docs_name_existing_keys():
  bad, seen = [], 0
  for path in DOCS:
    text = _without_error_examples(_read(path))
    for m in re.finditer(r"--config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", text):
      key = m.group(1)
      if key in PLACEHOLDERS:
        continue
      seen += 1
      if not _exists(key, leaf_only=True):
        bad.append(f"{_where(path, text, m.start())}: --config.{key}")
  assert seen, "no --config.<key> found"
  assert not bad, "docs override keys that do not exist:\n" + "\n".join(bad)


def test_dotted_config_keys_in_docs_exist():
  """A backticked name that starts with a block of base() and a dot (`data.kind`,
  `distill.temperature_mode=log_space`) must be a key or block of base(); name code by its
  module path (`first_jax.evaluate.run`) so it is not read as a key."""
  base = config_lib.base()
  top = sorted((k for k in base.keys() if hasattr(base[k], "keys")), key=len, reverse=True)
  pattern = re.compile(r"(?<![\w./-])((?:%s)(?:\.[a-z][a-z0-9_]*)+)" % "|".join(top))
  bad, seen = [], 0
  for path in DOCS:
    text = _read(path)
    for span in re.finditer(r"`([^`\n]+)`", text):
      for m in pattern.finditer(span.group(1)):
        key = m.group(1)
        if key.rsplit(".", 1)[1] in FILE_SUFFIXES:
          continue
        seen += 1
        if not _exists(key):
          bad.append(f"{_where(path, text, span.start())}: `{span.group(1)}` names {key}")
  assert seen > 20, seen
  assert not bad, "docs name config keys that do not exist:\n" + "\n".join(bad)


def test_train_help_exits_0_fast_and_lists_temperature_mode():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "first_jax.train", "--help"], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=120)
  took = time.time() - t0
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  line = next(l for l in lines if l.startswith("  distill.temperature_mode:"))
  assert "prob_softmax" in line and "log_space" in line, line
  assert "usage: python -m first_jax.train" in lines[0]
  assert took < 60, f"--help took {took:.1f} s"


def test_help_starts_no_jax_backend():
  code = ("import sys; from first_jax import cli; from first_jax.stages import train; "
          "rc = cli.stage_main(train.run, "
          "['--help']); from jax._src import xla_bridge as xb; "
          "sys.exit(rc or (3 if getattr(xb, '_backends', {}) else 0))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_first_jax_help_exits_0(args):
  proc = subprocess.run([sys.executable, "-c", "from first_jax import cli; cli.main()"] + args,
                        capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "usage: first-jax" in proc.stdout
