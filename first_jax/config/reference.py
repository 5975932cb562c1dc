"""The reference text generated from `SCHEMA`: docs/config.md (`python -m first_jax.config
--markdown`) and the override syntax `--help` prints."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from first_jax.config.schema import BLOCKS, defaults, format_default, SCHEMA, STAGES, type_name


# How `--config.KEY=VALUE` is read (the --help footer and docs/config.md).
OVERRIDE_SYNTAX = (
    "--config.KEY=VALUE (or --config.KEY VALUE) sets one key after --config FILE; the value is "
    "typed by the key's default: bool true/false (1/0, yes/no, on/off); int and float numbers; "
    "str as written; a tuple as a comma list (a,b for strings, 1,2 for numbers; a trailing "
    "comma or one item for a 1-tuple) or a Python literal (\"('a', 'b')\"); () or an empty "
    "value for the empty tuple. --config configs/X.py:ARG calls the file's get_config(\"ARG\").")

_MARKDOWN_HEAD = """\
# Config reference

<!-- Generated from first_jax/config/schema.py (SCHEMA: each key described once) by
     `python -m first_jax.config --markdown`; edit SCHEMA and re-run it, not this file.
     tests/test_docs.py fails when this file is stale. -->

Every stage reads one config: a Python file whose `get_config(arg)` returns an
`ml_collections.ConfigDict` that starts from `first_jax.config.base()`, plus command-line
overrides. This page lists every key: its type, default, allowed values or range, and the stages
that read it (`pipeline` runs every stage, so it reads every key).
`python -m first_jax.<stage> --help` (or `first-jax <stage> --help`) prints the same for one
stage.

Every key is checked at start-up, before any stage runs or anything is written: an unknown key,
a wrong type or a value outside the "allowed" column prints one line naming the key and exits 2;
so do the rules that tie keys together (mesh sizes against the device count, split fractions,
teacher and student vocabularies, `data.kind=text` rules, paths that must exist).

## Config files: `--config configs/X.py[:ARG]`

`--config configs/X.py` loads the file and calls its `get_config()`. `--config configs/X.py:ARG`
calls `get_config("ARG")` with everything after the first colon, one string that the file
parses itself: `configs/smoke.py:online` and `configs/smoke.py:text` pick variants,
`configs/demo.py:seed=1` and `configs/demo_long.py:seed=1,epochs=4` pass comma-separated
`name=value` pairs (see each file's docstring). A config file changes keys of `base()`; it
cannot add keys.

## Overrides: `--config.KEY=VALUE`

After `--config FILE`, any number of `--config.KEY=VALUE` (or `--config.KEY VALUE`), applied in
order, each typed by the key's default:

| type | write | example |
|---|---|---|
| bool | `true` / `false` (also `1`/`0`, `yes`/`no`, `on`/`off`) | `--config.resume=false` |
| int, float | a number | `--config.distill.lr=3e-4` |
| str | the text as it is | `--config.data.task=multiemo/hotels_sentence_en` |
| tuple[str] | a comma list, or a Python literal | `--config.students=sft,first` |
| tuple[int], tuple[float] | a comma list of numbers, or a literal | `--config.evaluate.num_bins=10,15` |
| a 1-tuple | one item (a trailing comma is allowed) | `--config.students=first` |
| the empty tuple | `()` or an empty value | `--config.data.ood_tasks=()` |

A Python literal is quoted for the shell: `--config.students="('sft', 'first')"`; quote an item
that holds a comma inside a comma list: `--config.data.ood_tasks="'a,b',c"`.

`distill.temperature` takes `calibrated`, `search` or a number (`--config.distill.temperature=1.5`).

## `calibrate.mode` vs `distill.temperature_mode`

`calibrate` searches the ECE-minimising temperature for every scaling mode (`prob_softmax`,
`log_space`) and tail handling (`bucket`, `renormalize`) and records them all in the store
manifest. `calibrate.mode` only picks which of these searches (with `distill.tail`) is recorded
as the store's headline `temperature`; it does not choose any student's temperature. Each
student variant trains with the search for its own mode and tail: `distill.temperature_mode` is
the default mode of `first` (and `distill.tail` its default tail), and a suffix overrides them
per variant (`first-log_space`, `first-renormalize`). So to train FIRST in log space, set
`distill.temperature_mode=log_space` or list `first-log_space` in `students`.

## Keys"""


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown() -> str:
  """docs/config.md: every key of the schema, grouped by block."""
  d = defaults()
  out = [_MARKDOWN_HEAD]
  sections: dict[str, list[str]] = {}
  for key in SCHEMA:
    top = key.split(".")[0] if "." in key else ""
    sections.setdefault(top, []).append(key)
  head = "| key | type | default | allowed | read by | description |\n|---|---|---|---|---|---|"
  for top, keys in sections.items():
    out.append(f"\n### {'`' + top + '`' if top else 'Top level'}\n")
    notes = [(b, text) for b, text in BLOCKS.items() if b == top or b.startswith(top + ".")]
    for b, text in notes if top else ():
      out.append(text + "\n" if b == top else f"`{b}`: {text}\n")
    out.append(head)
    for key in keys:
      spec = SCHEMA[key]
      stages = "all" if set(spec.stages) == set(STAGES) else ", ".join(spec.stages)
      allowed = spec.expected(key)
      out.append(f"| `{key}` | {_cell(type_name(key))} | `{_cell(format_default(d[key]))}` | "
                 f"{_cell(allowed) if allowed else '-'} | {stages} | {_cell(spec.doc)} |")
  return "\n".join(out) + "\n"


def main(argv: Sequence[str]) -> int:
  if not argv or argv[0] != "--markdown" or len(argv) > 2:
    print("usage: python -m first_jax.config --markdown [PATH | -]  (writes docs/config.md)",
          file=sys.stderr)
    return 2
  text = markdown()
  path = argv[1] if len(argv) > 1 else os.path.join("docs", "config.md")
  if path == "-":
    sys.stdout.write(text)
    return 0
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {path}")
  return 0
