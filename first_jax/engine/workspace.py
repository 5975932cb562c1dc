"""What a config resolves to: the workdir layout, the mesh, tokenizer, data and models.

    workdir/
      data/split.json             split record (indices + hashes per split), data fingerprint
      teacher/                    fine-tuning run (checkpoints/, metrics.jsonl) + export/ (HF)
      store/                      top-k store (manifest.json, shards), calibration_<mode>.png,
                                  topk_mass.png
      students/<variant>/         one training run per student variant + export/
      eval/                       results.json, results.md, reliability PNGs
      timings.json                seconds of each stage that did its work
Each stage folder gets a done.json holding the fingerprint of the config it ran with, so the
pipeline skips stages that are done and re-runs those whose inputs changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from first_jax.runtime import checkpoint, distributed, io_util, sharding
from first_jax.runtime.errors import UserError
from first_jax.data import assets, batches as data, sources, tokenizer as tokenizer_lib
from first_jax import config as config_lib, models

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- layout


def folder(cfg: ml_collections.ConfigDict, *parts: str) -> str:
  return os.path.join(os.path.abspath(cfg.workdir), *parts)


def fingerprint(*blocks: Any) -> str:
  """sha256 of config blocks (ConfigDicts or plain values), for done-markers."""
  def plain(x):
    return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x
  text = json.dumps([plain(b) for b in blocks], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# keys added after the first finished runs: hashed only when set away from their default, so
# that adding them did not invalidate those runs
_LATER_KEYS = {"data": ("kind", "text_fields", "answer_template", "on_bad_example",
                        "use_task_prefix", "neutral_band", "hf_name"),
               "finetune": ("length_buckets",)}


def _block(cfg: ml_collections.ConfigDict, name: str) -> dict:
  """`cfg[name]` as stage fingerprints hash it (see `_LATER_KEYS`)."""
  block, default = cfg[name].to_dict(), config_lib.base()[name].to_dict()
  later = _LATER_KEYS.get(name, ())
  return {k: v for k, v in block.items() if k not in later or v != default[k]}


def data_block(cfg: ml_collections.ConfigDict) -> dict:
  return _block(cfg, "data")


def _read_marker(marker: str) -> tuple[dict | None, str | None]:
  """(the JSON object in `marker`, None) or (None, why it is damaged): not JSON, not UTF-8, not
  an object, or no string "fingerprint". A missing file is (None, None)."""
  try:
    with open(marker, "rb") as f:
      obj = json.loads(f.read().decode())
  except FileNotFoundError:
    return None, None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    return None, f"not valid JSON ({(str(e).splitlines() or [type(e).__name__])[0]})"
  if not isinstance(obj, dict):
    return None, f"expected a JSON object, got {type(obj).__name__}"
  if not isinstance(obj.get("fingerprint"), str):
    return None, "no \"fingerprint\" string"
  return obj, None


_warned: set[tuple[str, int, int]] = set()  # damaged markers already reported (path, mtime, size)


def teacher_fingerprint(cfg: ml_collections.ConfigDict) -> str:
  """What the fine-tuned teacher depends on (its done-marker; the store and KD students record
  it, so a changed teacher invalidates them)."""
  return fingerprint(cfg.seed, cfg.tokenizer, data_block(cfg), cfg.teacher,
                     _block(cfg, "finetune"))


def done_fingerprint(path: str) -> str | None:
  """The fingerprint in `path`/done.json; None when absent, or damaged (one warning naming it:
  the run counts as not done and its stage runs again, resuming from its checkpoints)."""
  marker = os.path.join(path, "done.json")
  obj, damage = _read_marker(marker)
  if damage is not None:
    st = os.stat(marker)
    if (marker, st.st_mtime_ns, st.st_size) not in _warned:
      _warned.add((marker, st.st_mtime_ns, st.st_size))
      log.warning("%s: damaged (%s); treated as not done, the stage runs again", marker, damage)
    return None
  return None if obj is None else obj["fingerprint"]


def is_done(path: str, fp: str) -> bool:
  """Whether `path` holds a finished run of fingerprint `fp` (see `done_fingerprint`)."""
  return done_fingerprint(path) == fp


def mark_done(path: str, fp: str, **info: Any) -> None:
  """Written by process 0; every process leaves only once it is there."""
  if distributed.is_main():
    io_util.atomic_write_json(os.path.join(path, "done.json"), {"fingerprint": fp, **info})
  distributed.sync(f"done:{path}")


def finish_training(cfg: ml_collections.ConfigDict, path: str, fp: str, **info: Any) -> None:
  """Marks a training run done (after its export), then prunes its checkpoints as
  `checkpoint.after_done` says (none by default: the optimizer state is not kept past done)."""
  mark_done(path, fp, **info)
  prune_done(cfg, path)


def prune_done(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Prunes the checkpoints of the finished training run at `path` as `checkpoint.after_done`
  says; also called for a run found done, which finishes a pruning a kill interrupted (or one a
  re-run's policy now asks for)."""
  policy = cfg.checkpoint.after_done
  freed = checkpoint.after_done(os.path.join(path, "checkpoints"), policy)
  if freed:
    log.info("%s: done; checkpoints pruned (checkpoint.after_done=%s), %.1f MB freed", path,
             policy, freed / 1e6)


def start_run(path: str, fp: str) -> None:
  """Claims `path` for a training run of fingerprint `fp`.

  A folder left by a run of another config (its checkpoints must not be resumed into this one)
  is moved aside to `<path>.stale-<its fingerprint>`; a folder of the same config is kept, so
  the run resumes from its checkpoints.
  """
  if distributed.is_main():  # process 0 claims the folder for every process
    _claim(path, fp)
  distributed.sync(f"start:{path}")


def _claim(path: str, fp: str) -> None:
  marker = os.path.join(path, "run.json")
  if os.path.exists(path) and os.listdir(path):
    obj, damage = _read_marker(marker)
    old = obj["fingerprint"] if obj is not None else None
    if old == fp:
      return
    safe = old is not None and old.replace("-", "").replace("_", "").isalnum()
    aside = f"{path}.stale-{old if safe else 'unknown'}"
    if os.path.exists(aside):
      aside += f"-{int(time.time())}"
    if damage is not None:
      log.warning("%s: damaged (%s); its run is treated as another config's and moved to %s",
                  marker, damage, aside)
    else:
      log.warning("%s holds a run of another config; moved to %s", path, aside)
    os.rename(path, aside)
  io_util.atomic_write_json(marker, {"fingerprint": fp})


def start_over(path: str) -> str | None:
  """`resume=false`: moves a stage's existing output folder aside to `<path>.old-<unix time>`
  (one warning saying where) so the stage starts from nothing; returns where it went, or None
  when there was nothing to move. Process 0 moves it; every process leaves once it is moved."""
  aside = None
  if os.path.exists(path) and os.listdir(path):
    aside = base = f"{path}.old-{int(time.time())}"
    n = 1
    while os.path.exists(aside):  # two stages, or two runs, within one second
      n += 1
      aside = f"{base}-{n}"
    if distributed.is_main():
      os.rename(path, aside)
      log.warning("resume=false: moved %s to %s; the stage starts over", path, aside)
  distributed.sync(f"start_over:{path}")
  return aside


@contextlib.contextmanager
def lock(cfg: ml_collections.ConfigDict) -> Iterator[None]:
  """Holds `<workdir>/.lock` (an flock, released by the OS when the process dies: no stale
  locks) for one run; a second run on the workdir is a UserError naming the holder. Taken by
  process 0 only (the other hosts of a multi-host run share its workdir). A workdir this run
  created and left empty (e.g. a config error found by a stage's own checks) is removed."""
  if not distributed.is_main():
    yield
    return
  path = folder(cfg, ".lock")
  root = os.path.dirname(path)
  created = not os.path.exists(root)
  try:
    os.makedirs(root, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"config.workdir: cannot create {path} ({e.strerror})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise UserError(f"config.workdir: {os.path.dirname(path)} is in use by {holder}; wait for "
                      f"that run to end or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the flock
    if created and os.listdir(root) == [".lock"]:  # a run that wrote nothing leaves nothing
      os.remove(path)
      os.rmdir(root)


# ----------------------------------------------------------------------------- mesh


@functools.lru_cache(maxsize=None)
def _mesh(data_axis: int, fsdp: int, tensor: int):
  n = jax.device_count()
  sizes = [data_axis, fsdp, tensor]
  if -1 in sizes:
    fixed = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = n // fixed
  return sharding.make_mesh(*sizes)


def mesh(cfg: ml_collections.ConfigDict):
  return _mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


# ----------------------------------------------------------------------------- tokenizer/data


def tokenizer(cfg: ml_collections.ConfigDict):
  name = cfg.tokenizer
  if name in config_lib.MODEL_ASSETS:  # the tokenizer inside the model asset (its GGUF)
    name = str(assets.fetch(name))
  return tokenizer_lib.load(name)


@dataclasses.dataclass
class Data:
  splits: dict[str, dict[str, np.ndarray]]  # train / validation / test arrays (first_jax.data.batches)
  ood: dict[str, dict[str, np.ndarray]]  # out-of-domain task -> test arrays
  fingerprint: str  # of the in-domain examples, tokenizer and shapes
  num_choices: int  # kind=choice: the most choices of an example; kind=text: 0
  kind: str = "choice"


def answer_only(cfg: ml_collections.ConfigDict) -> bool:
  """Multiple choice with a response-only loss: one scored position per row (its answer), so
  the output head, the store and the events need that position only."""
  return cfg.data.kind == "choice" and cfg.data.loss_on == "response"


def _load_examples(cfg: ml_collections.ConfigDict, task: str, kind: str = "") -> list:
  """`task`'s examples from `data.source`, as `kind` (default `data.kind`) asks: choice
  (`MCExample`) or text (`TextExample`; a choice source's example answered through
  `data.answer_template`)."""
  d = cfg.data
  kind = kind or d.kind
  if d.source == "synthetic":
    mcs = sources.synthetic_mcqa(d.synthetic_size, seed=cfg.seed, kind=d.synthetic_kind)
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
    return sources.load_bigbench(path, shuffle_choices_seed=cfg.seed if d.shuffle_choices else None,
                                 use_task_prefix=d.use_task_prefix)
  if d.source == "hf":
    if kind == "text":
      return sources.load_hf_text(task, d.hf_split, d.text_fields.to_dict(),
                                  name=d.hf_name or None, on_bad=d.on_bad_example)
    return sources.load_hf(task, d.hf_split, d.hf_fields.to_dict(), name=d.hf_name or None)
  raise UserError(f"config.data.source: expected synthetic, vader, evals, bigbench or hf, got "
                  f"{d.source!r}")


def _subsample(examples: list, n: int, seed: int) -> list:
  if not n or n >= len(examples):
    return examples
  idx = np.random.default_rng(seed).permutation(len(examples))[:n]
  return [examples[i] for i in sorted(idx)]


def _encoder(cfg: ml_collections.ConfigDict, tok, num_choices: int):
  d = cfg.data
  if d.kind == "text":
    return functools.partial(data.encode_text, tok=tok, max_len=d.max_len, loss_on=d.loss_on,
                             use_chat_template=d.use_chat_template)
  return functools.partial(data.encode_mc, tok=tok, max_len=d.max_len, loss_on=d.loss_on,
                           use_chat_template=d.use_chat_template, num_choices=num_choices)


def _data_fingerprint(cfg: ml_collections.ConfigDict, tok, examples: list) -> str:
  d = cfg.data
  settings = dict(loss_on=d.loss_on, use_chat_template=d.use_chat_template)
  if d.kind == "text":  # (choice runs keep the fingerprints they had before text existed)
    settings.update(kind=d.kind, answer_template=d.answer_template)
  return data.fingerprint(examples, tokenizer_lib.tokenizer_hash(tok), d.max_len, **settings)


def data_fingerprint(cfg: ml_collections.ConfigDict, tok) -> str:
  """The fingerprint `load_data(cfg, tok).fingerprint` gives the in-domain data, without encoding
  anything or writing split.json (for the calibrate / evaluate done-checks)."""
  examples = _subsample(_load_examples(cfg, cfg.data.task), cfg.data.num_examples, cfg.seed)
  return _data_fingerprint(cfg, tok, examples)


def _split(cfg: ml_collections.ConfigDict) -> tuple[list, dict, dict]:
  """(examples, splits, split record) of the in-domain data, checked: no split is empty and
  the training batch sizes fit the training split."""
  d = cfg.data
  examples = _subsample(_load_examples(cfg, d.task), d.num_examples, cfg.seed)
  if not examples:
    raise UserError(f"config.data.task: {d.task or d.source!r} has no usable examples")
  splits, record = data.split_examples(
      examples, {"train": 1.0 - d.validation - d.test, "validation": d.validation,
                 "test": d.test}, seed=cfg.seed)
  for name, exs in splits.items():
    if not exs:
      key = {"train": "validation/test", "validation": "validation", "test": "test"}[name]
      raise UserError(f"config.data.{key}: the {name} split of {len(examples)} examples is "
                      f"empty (use more examples or other fractions)")
  for key in ("finetune.batch_size", "distill.batch_size"):
    block, _, field = key.partition(".")
    if cfg[block][field] > len(splits["train"]):
      raise UserError(f"config.{key}: expected at most the {len(splits['train'])} examples of "
                      f"the training split, got {cfg[block][field]}")
  return examples, splits, record


def check_data(cfg: ml_collections.ConfigDict) -> None:
  """The start-up check of what depends on the data itself: the in-domain examples are read
  and split (`_split`), the out-of-domain tasks read; nothing is tokenized or written."""
  _split(cfg)
  for task in cfg.data.ood_tasks:
    _load_examples(cfg, task)


def load_data(cfg: ml_collections.ConfigDict, tok) -> Data:
  """In-domain splits (recorded in data/split.json) and out-of-domain test sets, tokenized."""
  d = cfg.data
  examples, splits, record = _split(cfg)
  ood_examples = {task: _subsample(_load_examples(cfg, task), d.num_ood_examples, cfg.seed)
                  for task in d.ood_tasks}
  # one answer width for every set: the most choices of any in-domain or out-of-domain question
  num_choices = 0 if d.kind == "text" else max(
      len(ex.choices) for exs in (examples, *ood_examples.values()) for ex in exs)
  encode = _encoder(cfg, tok, num_choices)
  arrays = {name: encode(exs) for name, exs in splits.items()}
  ood = {task: encode(exs) for task, exs in ood_examples.items()}
  fp = _data_fingerprint(cfg, tok, examples)
  if distributed.is_main():
    data.save_split_record(folder(cfg, "data", "split.json"), {**record, "fingerprint": fp})
  return Data(splits=arrays, ood=ood, fingerprint=fp, num_choices=num_choices, kind=d.kind)


def load_choice_tasks(cfg: ml_collections.ConfigDict, tok) -> dict[str, dict[str, np.ndarray]]:
  """`evaluate.choice_tasks` (BIG-bench task.json files, or multiple-choice tasks of
  data.source vader / evals) as text rows, one per (example,
  choice), for log-likelihood scoring: the encoded rows plus `group` [R] (the row's example)
  and `label` [N]."""
  d, out = cfg.data, {}
  for task in cfg.evaluate.choice_tasks:
    if d.source in ("vader", "evals") and not task.endswith(".json"):
      exs = _load_examples(cfg, task, kind="choice")  # a task of the run's own source
    else:  # a BIG-bench task.json, or a task of a BIG-bench copy
      path = task if task.endswith(".json") else str(assets.bigbench_task_json(task))
      exs = sources.load_bigbench(path, shuffle_choices_seed=cfg.seed if d.shuffle_choices
                                  else None, use_task_prefix=d.use_task_prefix)
    exs = _subsample(exs, d.num_ood_examples, cfg.seed)
    rows, group_R = data.choice_rows(exs, d.answer_template)
    arrays = data.encode_text(rows, tok, d.max_len, use_chat_template=d.use_chat_template,
                              add_eos=False)
    arrays["group"] = group_R
    out[task] = {"rows": arrays, "label": np.asarray([e.label for e in exs], np.int64)}
  return out


# ----------------------------------------------------------------------------- models


def _source_path(path: str) -> str:
  return str(assets.fetch(path)) if path in config_lib.MODEL_ASSETS else path


def model_config(block: ml_collections.ConfigDict, prefix: str) -> models.ModelConfig:
  return models.ModelConfig.from_dict(block.model.to_dict(), prefix=f"{prefix}.model")


def with_params(model: models.Model, params: Any) -> models.Model:
  return models.Model(model.config, params)


def init_model(cfg: ml_collections.ConfigDict, who: str, tok) -> models.Model:
  """The pre-trained (or random) starting point of the teacher or student, sharded on the mesh.

  For init=pretrained/layer_subset the architecture comes from the checkpoint; of the `model`
  block only dtype, param_dtype and remat apply.
  """
  block = cfg[who]
  m = mesh(cfg)
  if block.init == "random":
    mc = model_config(block, who)
    if mc.vocab_size < len(tok):
      raise UserError(f"config.{who}.model.vocab_size: expected >= the tokenizer's {len(tok)}, "
                      f"got {mc.vocab_size}")
    seed = cfg.seed + (0 if who == "teacher" else 1)
    example = [jax.ShapeDtypeStruct((1, 8), np.int32)]
    params = sharding.init_sharded(models.Decoder(mc), m, sharding.DEFAULT_RULES,
                                   jax.random.key(seed), example, cfg.mesh.on_indivisible)
    return models.Model(mc, params)
  source = block.path if block.init == "pretrained" else cfg.teacher.path
  model = models.load_pretrained(_source_path(source), mesh=m, dtype=block.model.dtype,
                                 param_dtype=block.model.param_dtype, remat=block.model.remat,
                                 on_indivisible=cfg.mesh.on_indivisible)
  if block.init == "layer_subset":
    if not block.layers:
      raise UserError(f"config.{who}.layers: expected teacher layer indices for layer_subset")
    model = models.Model(*models.layer_subset(model.config, model.params, list(block.layers)))
  return model


def load_export(cfg: ml_collections.ConfigDict, stage_folder: str,
                who: str = "student") -> models.Model:
  path = os.path.join(stage_folder, "export")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise UserError(f"{path}: no exported model (run the stage that writes it first)")
  block = cfg[who].model
  return models.load_pretrained(path, mesh=mesh(cfg), dtype=block.dtype,
                                param_dtype=block.param_dtype, remat=block.remat,
                                on_indivisible=cfg.mesh.on_indivisible)


def export(model: models.Model, tok, path: str) -> None:
  """HF-format model (config.json + model.safetensors) plus its tokenizer, for serving.
  A model with a non-finite parameter is refused (never exported, so never marked done)."""
  finite = jax.tree.map(lambda x: bool(jax.numpy.isfinite(x).all()), model.params)
  bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_leaves_with_path(finite)
         if not ok]
  if bad:
    raise UserError(f"{path}: not exported, non-finite parameters in {', '.join(bad[:3])}")
  if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
    from jax.experimental import multihost_utils
    model = models.Model(model.config, multihost_utils.process_allgather(model.params, tiled=True))
  if distributed.is_main():
    # a killed export's temp files (the workdir is locked): io_util's, and safetensors' own
    # (save_file writes <dir>/.tmpXXXXXX, then renames it)
    io_util.remove_stale_temps(path, ".tmp-*", ".tmp" + "[0-9A-Za-z]" * 6)
    models.save_pretrained(model, path)
    tok.save_pretrained(path)
  distributed.sync(f"export:{path}")
