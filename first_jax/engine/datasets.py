"""A run's data, from the config's `data` block: the examples of `data.source`, the in-domain
splits (checked, recorded), the out-of-domain test sets and choice tasks, tokenized."""
from __future__ import annotations

import dataclasses
import functools
import os

import ml_collections
import numpy as np

from first_jax.runtime import distributed
from first_jax.runtime.errors import UserError
from first_jax.data import assets, batches as data, sources, tokenizer as tokenizer_lib


@dataclasses.dataclass
class Data:
  splits: dict[str, dict[str, np.ndarray]]  # train / validation / test arrays (first_jax.data.batches)
  ood: dict[str, dict[str, np.ndarray]]  # out-of-domain task -> test arrays
  fingerprint: str  # of the in-domain examples, tokenizer and shapes
  num_choices: int  # kind=choice: the most choices of an example; kind=text: 0
  kind: str = "choice"


def load_examples(d: ml_collections.ConfigDict, seed: int, task: str, kind: str = "") -> list:
  """`task`'s examples from `data.source`, as `kind` (default `data.kind`) asks: choice
  (`MCExample`) or text (`TextExample`; a choice source's example answered through
  `data.answer_template`); `d` is the config's `data` block, `seed` the run's."""
  kind = kind or d.kind
  if d.source == "synthetic":
    mcs = sources.synthetic_mcqa(d.synthetic_size, seed=seed, kind=d.synthetic_kind)
    if kind == "text":  # the options go into the prompt (the toy questions do not name them)
      return [data.mc_as_text(dataclasses.replace(e, input=f"{e.input}\nOptions: "
                                                  f"{', '.join(e.choices)}"), d.answer_template)
              for e in mcs]
    return mcs
  if d.source == "vader":
    mcs = sources.load_vader(task, neutral_band=d.neutral_band)
    return [data.mc_as_text(e, d.answer_template) for e in mcs] if kind == "text" else mcs
  if d.source == "evals":
    path = task if os.path.isfile(task) else str(assets.evals_file(task))
    if kind == "text":
      return sources.load_evals_text(path, on_bad=d.on_bad_example)
    return sources.load_evals(path, on_bad=d.on_bad_example)
  if d.source == "bigbench":
    path = task if task.endswith(".json") else str(assets.bigbench_task_json(task))
    if kind == "text":
      return sources.load_bigbench_text(path, answer_template=d.answer_template,
                                        use_task_prefix=d.use_task_prefix,
                                        on_bad=d.on_bad_example)
    return sources.load_bigbench(path, shuffle_choices_seed=seed if d.shuffle_choices else None,
                                 use_task_prefix=d.use_task_prefix)
  if d.source == "hf":
    if kind == "text":
      return sources.load_hf_text(task, d.hf_split, d.text_fields.to_dict(),
                                  name=d.hf_name or None, on_bad=d.on_bad_example)
    return sources.load_hf(task, d.hf_split, d.hf_fields.to_dict(), name=d.hf_name or None)
  raise UserError(f"config.data.source: expected synthetic, vader, evals, bigbench or hf, got "
                  f"{d.source!r}")


def subsample(examples: list, n: int, seed: int) -> list:
  if not n or n >= len(examples):
    return examples
  idx = np.random.default_rng(seed).permutation(len(examples))[:n]
  return [examples[i] for i in sorted(idx)]


def _encoder(d: ml_collections.ConfigDict, tok, num_choices: int):
  if d.kind == "text":
    return functools.partial(data.encode_text, tok=tok, max_len=d.max_len, loss_on=d.loss_on,
                             use_chat_template=d.use_chat_template)
  return functools.partial(data.encode_mc, tok=tok, max_len=d.max_len, loss_on=d.loss_on,
                           use_chat_template=d.use_chat_template, num_choices=num_choices)


def _fingerprint(d: ml_collections.ConfigDict, tok, examples: list) -> str:
  settings = dict(loss_on=d.loss_on, use_chat_template=d.use_chat_template)
  if d.kind == "text":  # (choice runs keep the fingerprints they had before text existed)
    settings.update(kind=d.kind, answer_template=d.answer_template)
  return data.fingerprint(examples, tokenizer_lib.tokenizer_hash(tok), d.max_len, **settings)


def fingerprint(d: ml_collections.ConfigDict, seed: int, tok) -> str:
  """The fingerprint `load(d, seed, tok, ...).fingerprint` gives the in-domain data, without
  encoding anything or writing split.json (for the done-checks)."""
  return _fingerprint(d, tok, subsample(load_examples(d, seed, d.task), d.num_examples, seed))


def _split(d: ml_collections.ConfigDict, seed: int, batch_sizes: dict[str, int]
           ) -> tuple[list, dict, dict]:
  """(examples, splits, split record) of the in-domain data, checked: no split is empty and
  the training batch sizes (config key -> size) fit the training split."""
  examples = subsample(load_examples(d, seed, d.task), d.num_examples, seed)
  if not examples:
    raise UserError(f"config.data.task: {d.task or d.source!r} has no usable examples")
  splits, record = data.split_examples(
      examples, {"train": 1.0 - d.validation - d.test, "validation": d.validation,
                 "test": d.test}, seed=seed)
  for name, exs in splits.items():
    if not exs:
      key = {"train": "validation/test", "validation": "validation", "test": "test"}[name]
      raise UserError(f"config.data.{key}: the {name} split of {len(examples)} examples is "
                      f"empty (use more examples or other fractions)")
  for key, size in batch_sizes.items():
    if size > len(splits["train"]):
      raise UserError(f"config.{key}: expected at most the {len(splits['train'])} examples of "
                      f"the training split, got {size}")
  return examples, splits, record


def check(d: ml_collections.ConfigDict, seed: int, batch_sizes: dict[str, int]) -> None:
  """The start-up check of what depends on the data itself: the in-domain examples are read
  and split (`_split`), the out-of-domain tasks read; nothing is tokenized or written."""
  _split(d, seed, batch_sizes)
  for task in d.ood_tasks:
    load_examples(d, seed, task)


def load(d: ml_collections.ConfigDict, seed: int, tok, batch_sizes: dict[str, int],
         record_path: str) -> Data:
  """In-domain splits (recorded at `record_path`, data/split.json) and out-of-domain test sets,
  tokenized."""
  examples, splits, record = _split(d, seed, batch_sizes)
  ood_examples = {task: subsample(load_examples(d, seed, task), d.num_ood_examples, seed)
                  for task in d.ood_tasks}
  # one answer width for every set: the most choices of any in-domain or out-of-domain question
  num_choices = 0 if d.kind == "text" else max(
      len(ex.choices) for exs in (examples, *ood_examples.values()) for ex in exs)
  encode = _encoder(d, tok, num_choices)
  arrays = {name: encode(exs) for name, exs in splits.items()}
  ood = {task: encode(exs) for task, exs in ood_examples.items()}
  fp = _fingerprint(d, tok, examples)
  if distributed.is_main():
    data.save_split_record(record_path, {**record, "fingerprint": fp})
  return Data(splits=arrays, ood=ood, fingerprint=fp, num_choices=num_choices, kind=d.kind)


def load_choice_tasks(d: ml_collections.ConfigDict, seed: int, tasks: tuple[str, ...], tok
                      ) -> dict[str, dict[str, np.ndarray]]:
  """`tasks` (`evaluate.choice_tasks`: BIG-bench task.json files, or multiple-choice tasks of
  data.source vader / evals) as text rows, one per (example, choice), for log-likelihood
  scoring: the encoded rows plus `group` [R] (the row's example) and `label` [N]."""
  out = {}
  for task in tasks:
    if d.source in ("vader", "evals") and not task.endswith(".json"):
      exs = load_examples(d, seed, task, kind="choice")  # a task of the run's own source
    else:  # a BIG-bench task.json, or a task of a BIG-bench copy
      path = task if task.endswith(".json") else str(assets.bigbench_task_json(task))
      exs = sources.load_bigbench(path, shuffle_choices_seed=seed if d.shuffle_choices
                                  else None, use_task_prefix=d.use_task_prefix)
    exs = subsample(exs, d.num_ood_examples, seed)
    rows, group_R = data.choice_rows(exs, d.answer_template)
    arrays = data.encode_text(rows, tok, d.max_len, use_chat_template=d.use_chat_template,
                              add_eos=False)
    arrays["group"] = group_R
    out[task] = {"rows": arrays, "label": np.asarray([e.label for e in exs], np.int64)}
  return out
