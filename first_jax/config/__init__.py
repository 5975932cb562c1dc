"""Configs: a Python file whose `get_config(arg)` returns a ConfigDict, plus `--config.a.b=v`.

    python -m first_jax.train --config configs/smoke.py:variant --config.distill.tail=renormalize

`SCHEMA` (schema.py) describes each key once: its default, what it means, what it may hold and
which stages read it; `base()` is built from it. `validate()` (checks.py) checks every key
against the schema (unknown keys, types, allowed values, ranges) and then the rules that tie keys
together; `--help` and docs/config.md (`python -m first_jax.config --markdown`, reference.py) are
generated from the same schema. `ml_collections.config_flags` parses the command line (load.py):
the file and the overrides, each typed by the default it replaces;
unknown keys, wrong types, missing files and impossible values are `UserError`s naming the key.
The result is locked: stages read it, never write it.
"""
from first_jax.config.checks import MODEL_ASSETS, TOKENIZER_ASSETS, check_key, check_keys, validate
from first_jax.config.load import load, load_file, parse
from first_jax.config.recipes import paper_scale, trust_regime
from first_jax.config.reference import OVERRIDE_SYNTAX, markdown
from first_jax.config.schema import (BLOCKS, SCHEMA, STAGES, Key, base, blocks, defaults,
                                     format_default, keys_for, leaves, model_block, type_name)

__all__ = [
    "BLOCKS", "Key", "MODEL_ASSETS", "OVERRIDE_SYNTAX", "SCHEMA", "STAGES", "TOKENIZER_ASSETS",
    "base", "blocks", "check_key", "check_keys", "defaults", "format_default",
    "keys_for", "leaves", "load", "load_file", "markdown", "model_block", "paper_scale",
    "parse", "trust_regime", "type_name", "validate",
]
