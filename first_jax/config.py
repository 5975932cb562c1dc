"""Configs: a Python file whose `get_config(arg)` returns a ConfigDict, plus `--config.a.b=v`.

    python -m first_jax.train --config configs/smoke.py:variant --config.distill.tail=renormalize

Overrides are typed by the default they replace; unknown keys, wrong types, missing files and
impossible values are `UserError`s naming the key. The result is locked: stages read it, never
write it.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections

from first_jax.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns get_config(arg)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: file not found (expected a Python file defining get_config)")
  module_spec = importlib.util.spec_from_file_location("_first_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"--config {path}: defines no get_config()")
  cfg = module.get_config(arg) if arg else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


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
      value = ast.literal_eval(text) if text.strip() else ()
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return kind(value)
    if default is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
  except (ValueError, SyntaxError):
    pass
  raise UserError(f"config.{key}: expected {kind.__name__}, got {text!r}")


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


def _require(ok: bool, key: str, expected: str, got: Any) -> None:
  if not ok:
    raise UserError(f"config.{key}: expected {expected}, got {got!r}")


# Names that `first_jax.assets` fetches instead of a local path.
MODEL_ASSETS = ("smollm2",)
TOKENIZER_ASSETS = ("gpt2", "smollm2")


def _check_model_source(cfg: ml_collections.ConfigDict, who: str) -> None:
  block = cfg[who]
  _require(block.init in ("random", "pretrained", "layer_subset"), f"{who}.init",
           "one of random, pretrained, layer_subset", block.init)
  if block.init == "layer_subset":  # layers of the pre-trained teacher
    _require(who == "student" and cfg.teacher.init == "pretrained", f"{who}.init",
             "layer_subset only for the student of a pre-trained teacher", block.init)
    return
  if block.init != "random" and block.path not in MODEL_ASSETS:
    _require(os.path.exists(block.path), f"{who}.path",
             "an existing HF model directory, .gguf file or asset name", block.path)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Start-up checks of the values every stage relies on (one clear line each)."""
  import jax  # local: keep `--help`-style failures fast

  mesh = cfg.mesh
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  for name, size in zip(("data", "fsdp", "tensor"), sizes):
    _require(size == -1 or size >= 1, f"mesh.{name}", "a positive size or -1 (fill)", size)
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
  _require(k >= 1, "extract.k", "an integer >= 1", k)
  vocab = cfg.teacher.model.vocab_size if "model" in cfg.teacher else None
  if vocab:
    _require(k <= vocab, "extract.k", f"<= the vocabulary size {vocab}", k)
  for block in ("finetune", "distill"):
    o = cfg[block]
    _require(math.isfinite(o.lr) and o.lr > 0, f"{block}.lr", "a finite positive learning rate",
             o.lr)
    for key in ("batch_size", "epochs", "grad_accum"):
      _require(o[key] >= 1, f"{block}.{key}", "an integer >= 1", o[key])
    _require(0 <= o.warmup_ratio < 1, f"{block}.warmup_ratio", "0 <= value < 1", o.warmup_ratio)
    _require(o.weight_decay >= 0, f"{block}.weight_decay", "a value >= 0", o.weight_decay)
    _require(o.clip_norm > 0, f"{block}.clip_norm", "a value > 0", o.clip_norm)
    _require(0 <= o.label_smoothing < 1, f"{block}.label_smoothing", "0 <= value < 1",
             o.label_smoothing)
  _require(0 <= cfg.seed < 2**32, "seed", "an integer in [0, 2**32)", cfg.seed)
  _require(cfg.extract.logprob_dtype in ("float16", "bfloat16"), "extract.logprob_dtype",
           "float16 or bfloat16", cfg.extract.logprob_dtype)
  for key in ("batch_size", "shard_size"):
    _require(cfg.extract[key] >= 1, f"extract.{key}", "an integer >= 1", cfg.extract[key])
  _require(cfg.evaluate.batch_size >= 1, "evaluate.batch_size", "an integer >= 1",
           cfg.evaluate.batch_size)
  nb = cfg.evaluate.num_bins
  _require(len(nb) >= 1 and all(isinstance(b, int) and b >= 1 for b in nb), "evaluate.num_bins",
           "a non-empty tuple of bin counts >= 1", nb)
  _require(cfg.calibrate.num_bins >= 1, "calibrate.num_bins", "an integer >= 1",
           cfg.calibrate.num_bins)
  _require(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "an integer >= 1",
           cfg.checkpoint.every_steps)
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "an integer >= 1", cfg.checkpoint.keep)
  _require(cfg.log_every_steps >= 1, "log_every_steps", "an integer >= 1", cfg.log_every_steps)
  _require(cfg.data.num_examples >= 0, "data.num_examples", "0 (all) or a count",
           cfg.data.num_examples)
  _require(cfg.data.num_ood_examples >= 0, "data.num_ood_examples", "0 (all) or a count",
           cfg.data.num_ood_examples)
  _require(cfg.distill.direction in ("forward", "reverse", "jsd"), "distill.direction",
           "forward, reverse or jsd", cfg.distill.direction)
  _require(cfg.distill.temperature_mode in ("prob_softmax", "log_space"),
           "distill.temperature_mode", "prob_softmax or log_space", cfg.distill.temperature_mode)
  t = cfg.distill.temperature
  if t not in ("calibrated", "search"):
    try:
      ok = math.isfinite(float(t)) and float(t) > 0
    except (TypeError, ValueError):
      ok = False
    _require(ok, "distill.temperature", "calibrated, search or a positive number", t)
  if "model" in cfg.student and cfg.student.init == cfg.teacher.init == "random":
    _require(cfg.student.model.vocab_size == cfg.teacher.model.vocab_size,
             "student.model.vocab_size", f"the teacher's vocabulary size "
             f"{cfg.teacher.model.vocab_size} (the top-k ids index both)",
             cfg.student.model.vocab_size)
  _require(cfg.calibrate.mode in ("prob_softmax", "log_space"), "calibrate.mode",
           "prob_softmax or log_space", cfg.calibrate.mode)
  _require(cfg.evaluate.scoring in ("choices", "vocab"), "evaluate.scoring", "choices or vocab",
           cfg.evaluate.scoring)
  d = cfg.distill
  _require(d.seed >= -1, "distill.seed", "-1 (the run's seed) or a seed >= 0", d.seed)
  _require(d.search_events >= 1, "distill.search_events", "an integer >= 1", d.search_events)
  _require(0 <= d.search_min_events <= d.search_events, "distill.search_min_events",
           "0 <= value <= distill.search_events", d.search_min_events)
  _require(0.0 <= d.temperature_ema < 1.0, "distill.temperature_ema", "0 <= value < 1",
           d.temperature_ema)
  _require(all(isinstance(b, int) and 2 <= b <= cfg.data.max_len for b in d.length_buckets),
           "distill.length_buckets", f"lengths between 2 and data.max_len ({cfg.data.max_len})",
           d.length_buckets)
  _require(cfg.distill.tail in ("bucket", "renormalize"), "distill.tail",
           "bucket or renormalize", cfg.distill.tail)
  _require(cfg.distill.mode in ("offline", "online"), "distill.mode", "offline or online",
           cfg.distill.mode)
  split = cfg.data.validation + cfg.data.test
  _require(cfg.data.validation > 0 and cfg.data.test > 0 and split < 1, "data.validation",
           "validation and test fractions > 0 summing to < 1", (cfg.data.validation, cfg.data.test))
  _require(cfg.data.loss_on in ("response", "all"), "data.loss_on", "response or all",
           cfg.data.loss_on)
  _require(cfg.data.kind in ("choice", "text"), "data.kind", "choice or text", cfg.data.kind)
  _require(cfg.data.on_bad_example in ("error", "skip"), "data.on_bad_example", "error or skip",
           cfg.data.on_bad_example)
  _require("{answer}" in cfg.data.answer_template, "data.answer_template",
           "a template with an {answer} field", cfg.data.answer_template)
  g = tuple(cfg.evaluate.post_hoc_grid)
  _require(len(g) == 3 and all(isinstance(x, (int, float)) for x in g) and 0 < g[0] < g[1]
           and int(g[2]) == g[2] >= 2, "evaluate.post_hoc_grid",
           "(lowest t > 0, highest t, number of points >= 2)", cfg.evaluate.post_hoc_grid)
  if cfg.data.kind == "text":
    _require(cfg.data.loss_on == "response", "data.loss_on",
             "response for data.kind=text (prompt tokens are never distilled)", cfg.data.loss_on)
    _require(cfg.data.source in ("synthetic", "bigbench", "hf"), "data.source",
             "synthetic, bigbench or hf", cfg.data.source)
    bad = [s for s in cfg.students if s.partition("@")[0] == "sft_ls-choices"]
    _require(not bad, "students", "no sft_ls-choices for data.kind=text (no answer letters)",
             bad)
  else:
    _require(not cfg.evaluate.choice_tasks, "evaluate.choice_tasks",
             "() for data.kind=choice (its own task is the choice task)",
             cfg.evaluate.choice_tasks)
  _require(cfg.data.source in ("synthetic", "bigbench", "hf"), "data.source",
           "synthetic, bigbench or hf", cfg.data.source)
  looks_local = cfg.data.task.endswith((".json", ".jsonl", ".parquet", ".csv"))
  if cfg.data.source in ("bigbench", "hf") and looks_local:
    _require(os.path.exists(cfg.data.task), "data.task", "an existing data file", cfg.data.task)
  if cfg.tokenizer not in TOKENIZER_ASSETS and not os.path.exists(cfg.tokenizer):
    raise UserError(f"config.tokenizer: expected an existing tokenizer dir/file or an asset "
                    f"name (gpt2, smollm2), got {cfg.tokenizer!r}")
  for who in ("teacher", "student"):
    _check_model_source(cfg, who)
  for path in cfg.evaluate.models:
    _require(os.path.exists(path), "evaluate.models", "existing HF model dirs or .gguf files",
             path)


def model_block(**fields: Any) -> ml_collections.ConfigDict:
  """A model architecture block (fields of first_jax.models.ModelConfig)."""
  base = dict(model_type="llama", vocab_size=50257, hidden_size=64, intermediate_size=128,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
              max_position_embeddings=2048, dtype="float32", param_dtype="float32",
              remat=False, scan_layers=True)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def base() -> ml_collections.ConfigDict:
  """Every key a stage reads, with its default. Experiment configs start here and override."""
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/run"  # everything a run writes: one folder per stage
  c.seed = 0
  c.resume = True  # continue from the latest checkpoint / finished store shards
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
  c.tokenizer = "gpt2"  # asset name (gpt2, smollm2), HF tokenizer dir, tokenizer.json or .gguf

  c.data = ml_collections.ConfigDict(dict(
      # choice: multiple choice, one answer-letter token scored; text: prompt/response pairs,
      # every response token scored (instruction data, generative BIG-bench tasks, or a choice
      # task phrased as text through `answer_template`)
      kind="choice",
      source="synthetic",  # synthetic | bigbench | hf (HF `datasets`: local file or hub name)
      task="",  # BIG-bench task name (e.g. multiemo/hotels_sentence_en), a file, a hub name
      hf_split="train",  # for source=hf: the split read (our own splits are made from it)
      hf_fields=ml_collections.ConfigDict(dict(input="question", choices="choices",
                                               label="answer")),  # column names, for hf
      # kind=text, source=hf: columns of the prompt, its optional context (joined after a blank
      # line) and the response; the defaults read Alpaca-style JSONL as it is
      text_fields=ml_collections.ConfigDict(dict(prompt="instruction", context="input",
                                                 response="output")),
      # kind=text: a choice example (BIG-bench target_scores, synthetic) becomes the response
      # answer_template.format(answer=<gold choice text>), e.g. "Sentiment: {answer}"
      answer_template="{answer}",
      on_bad_example="error",  # kind=text: a record without prompt or response: error | skip
      use_task_prefix=True,  # BIG-bench: put the task's task_prefix before each input
      ood_tasks=(),  # evaluated out-of-domain (same source kind)
      num_examples=0,  # 0: all; else a seeded subsample of the in-domain task
      num_ood_examples=0,  # per out-of-domain task, 0: all
      validation=0.1, test=0.2,  # split fractions (train is the rest); disjoint, recorded
      max_len=64,  # one padded length, so each step compiles once
      loss_on="response",  # response (text2text) | all (text-only)
      use_chat_template=False,
      shuffle_choices=True,  # BIG-bench lists the gold choice first; keep False for fixed label sets
      synthetic_size=600,
      synthetic_kind="numbers",  # numbers | categories (see first_jax.sources.synthetic_mcqa)
  ))
  c.teacher = ml_collections.ConfigDict(dict(
      init="random",  # random | pretrained
      path="",  # HF dir, .gguf or asset name, for init=pretrained
      model=model_block(),
  ))
  c.student = ml_collections.ConfigDict(dict(
      init="random",  # random | pretrained | layer_subset (of the PRE-TRAINED teacher)
      path="",
      layers=(),  # for layer_subset: teacher layer indices kept
      model=model_block(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
  ))
  optim = dict(lr=1e-3, epochs=1, batch_size=8, grad_accum=1, warmup_ratio=0.03,
               weight_decay=0.0, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  c.finetune = ml_collections.ConfigDict(dict(optim, label_smoothing=0.0))
  c.distill = ml_collections.ConfigDict(dict(
      optim,
      mode="offline",  # offline: targets from the store; online: teacher inside the step
      tail="bucket",  # bucket (k+1-th bin for the tail) | renormalize
      direction="forward",  # forward | reverse | jsd
      temperature="calibrated",  # calibrated (from the store manifest) | search (online) | a number
      temperature_mode="prob_softmax",  # prob_softmax (paper) | log_space
      temperature_ema=0.0,  # smoothing of the in-step searched temperature over steps
      search_events=1024,  # online search: events kept from the latest steps (a ring buffer)
      search_min_events=256,  # online search: the start temperature is kept until this many
      label_smoothing=0.1,  # of the sft_ls student baseline
      seed=-1,  # students' batch order; -1: config.seed (>= 0: student seeds over one teacher)
      # Batch rows of similar length together and cut each batch's padding to the smallest of
      # these lengths holding it (one compile each); (): every batch at data.max_len. Also cuts
      # the padding of evaluation batches (rows scored shortest first).
      length_buckets=(),
  ))
  c.extract = ml_collections.ConfigDict(dict(
      k=5, logprob_dtype="float16", batch_size=16, shard_size=256))
  c.calibrate = ml_collections.ConfigDict(dict(
      mode="prob_softmax", num_bins=10, refine=True,
      require_premise=False,  # stop before the students if the teacher is not over-confident
  ))
  c.evaluate = ml_collections.ConfigDict(dict(
      batch_size=32, num_bins=(10, 15),
      # What confidence and correctness mean, in the temperature search, the post-hoc scaling
      # fits and the headline metrics alike: choices = softmax over the answer letters
      # (lm-eval style); vocab = the full-vocabulary top-1 (FIRST's reference code).
      scoring="choices",
      post_hoc=("sft", "first"),  # students also reported with post-hoc temperature scaling
      models=(),  # extra HF model dirs / .gguf files to evaluate beside the workdir's models
      # data.kind=text: BIG-bench multiple-choice tasks also evaluated, each choice scored by
      # the log-likelihood of its text (data.answer_template) after the prompt
      choice_tasks=(),
      # data.kind=text: post-hoc temperatures are chosen on this log-spaced grid (exact token NLL)
      post_hoc_grid=(0.25, 4.0, 33),
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, keep=2))
  c.log_every_steps = 10
  # Student variants the pipeline trains and evaluates (see first_jax/pipeline.py).
  c.students = ("sft", "kd", "first")
  return c
