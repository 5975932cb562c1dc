"""A run resolved once: what a validated config means to the stages.

`Job(cfg)` is built at start-up, after validation, and passed down: the workdir `layout`, the
models' `ModelSpec`s, whether the loss is on the answer only, the training batch sizes, and the
fingerprints that tie the stages' outputs together (`teacher_fingerprint`, `data_block`). What
costs time is made when first asked for, once per run (a pipeline's stages share it): the
`mesh`, the `tokenizer`, the `data` (tokenized splits) and its `data_fingerprint` (without
encoding anything, for the done-checks). A stage reads its own config block from `job.cfg`.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from first_jax.runtime import sharding
from first_jax.data import assets, tokenizer as tokenizer_lib
from first_jax import config as config_lib, models
from first_jax.engine import datasets, modelio, trainer, workspace

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


def teacher_fingerprint(cfg: ml_collections.ConfigDict) -> str:
  """What the fine-tuned teacher depends on (its done-marker; the store and KD students record
  it, so a changed teacher invalidates them). A served teacher is its served name and schema
  with the tokenizer: what the server runs is the server's (serve a changed teacher under a new
  name)."""
  if cfg.teacher.source == "server":
    s = cfg.teacher.server
    return workspace.fingerprint("served", s.api, s.model, cfg.tokenizer)
  return workspace.fingerprint(cfg.seed, cfg.tokenizer, _block(cfg, "data"), _model_block(cfg),
                               _block(cfg, "finetune"))


def _model_block(cfg: ml_collections.ConfigDict) -> dict:
  """The teacher block as its weights depend on it: without `source` and `server`."""
  return {k: v for k, v in cfg.teacher.to_dict().items() if k not in ("source", "server")}


def pretrained_teacher_fingerprint(cfg: ml_collections.ConfigDict) -> str:
  """The teacher before fine-tuning (its cached evaluation scores)."""
  return workspace.fingerprint(cfg.seed, cfg.tokenizer, _model_block(cfg))


@functools.lru_cache(maxsize=None)
def _mesh(data_axis: int, fsdp: int, tensor: int):
  n = jax.device_count()
  sizes = [data_axis, fsdp, tensor]
  if -1 in sizes:
    fixed = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = n // fixed
  return sharding.make_mesh(*sizes)


def load_tokenizer(name: str):
  """`config.tokenizer`: a tokenizer asset, a model asset (the tokenizer inside its GGUF), a
  local folder or a Hugging Face name."""
  if name in config_lib.MODEL_ASSETS:
    name = str(assets.fetch(name))
  return tokenizer_lib.load(name)


def answer_only(cfg: ml_collections.ConfigDict) -> bool:
  """Multiple choice with a response-only loss: one scored position per row (its answer), so
  the output head, the store and the events need that position only."""
  return cfg.data.kind == "choice" and cfg.data.loss_on == "response"


def model_spec(cfg: ml_collections.ConfigDict, who: str) -> modelio.ModelSpec:
  block = cfg[who]
  source = block.path if block.init == "pretrained" else cfg.teacher.path
  return modelio.ModelSpec(
      who=who, init=block.init, source=source, source_is_asset=source in config_lib.MODEL_ASSETS,
      layers=tuple(block.get("layers", ())), model=block.model.to_dict(),
      seed=cfg.seed + (0 if who == "teacher" else 1), on_indivisible=cfg.mesh.on_indivisible)


class Job:
  """What one run of a validated config resolves to (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.layout = workspace.Layout.of(cfg.workdir)
    self.seed = cfg.seed
    self.resume = cfg.resume
    self.teacher = model_spec(cfg, "teacher")
    self.student = model_spec(cfg, "student")
    self.answer_only = answer_only(cfg)
    self.batch_sizes = {"finetune.batch_size": cfg.finetune.batch_size,
                        "distill.batch_size": cfg.distill.batch_size}
    self.data_block = _block(cfg, "data")
    self.teacher_fingerprint = teacher_fingerprint(cfg)

  @functools.cached_property
  def mesh(self):
    m = self.cfg.mesh
    return _mesh(m.data, m.fsdp, m.tensor)

  @functools.cached_property
  def tokenizer(self):
    return load_tokenizer(self.cfg.tokenizer)

  @functools.cached_property
  def data(self) -> datasets.Data:
    """In-domain splits (recorded in data/split.json) and out-of-domain sets, tokenized."""
    return datasets.load(self.cfg.data, self.seed, self.tokenizer, self.batch_sizes,
                         self.layout.split_record)

  @functools.cached_property
  def data_fingerprint(self) -> str:
    """The in-domain data's fingerprint; before `data` is loaded, without encoding anything."""
    if "data" in self.__dict__:
      return self.data.fingerprint
    return datasets.fingerprint(self.cfg.data, self.seed, self.tokenizer)

  def served_teacher(self):
    """The teacher behind `teacher.server` (source=server), checked the first time it is asked
    for (reachable, model served, top-k allowed, same tokenizer); before anything is written."""
    if "_served" not in self.__dict__:
      from first_jax.engine import served  # pylint: disable=import-outside-toplevel
      client = served.Client(served.Server.of(self.cfg.teacher.server), self.tokenizer)
      client.check(max(served.REPORT_K, self.cfg.extract.k))
      self._served = client
    return self._served

  def check_data(self) -> None:
    """The start-up check of the data itself (read and split; nothing encoded or written)."""
    datasets.check(self.cfg.data, self.seed, self.batch_sizes)

  def choice_tasks(self) -> dict[str, dict[str, np.ndarray]]:
    return datasets.load_choice_tasks(self.cfg.data, self.seed, self.cfg.evaluate.choice_tasks,
                                      self.tokenizer)

  def init_model(self, who: str) -> models.Model:
    """The teacher's or student's starting point, sharded on the mesh."""
    return modelio.init_model(getattr(self, who), self.mesh, self.tokenizer)

  def load_export(self, folder: str, who: str = "student") -> models.Model:
    """The model exported into `folder`/export, as `who`'s config block loads it."""
    return modelio.load_export(folder, getattr(self, who), self.mesh)

  def export(self, model: models.Model, params: Any, folder: str) -> None:
    modelio.export(modelio.with_params(model, params), self.tokenizer,
                   os.path.join(folder, "export"))

  def train(self, name: str, folder: str, model: models.Model, arrays: dict, spec, optim,
            seed: int, **teacher: Any) -> Any:
    """Trains `model` on `arrays` (`trainer.train_model`) with the run's mesh, resume and
    checkpoint settings; `teacher`: what a KD student adds (the online teacher's module and
    params, or the store's targets, and its start temperature). Returns the parameters."""
    c = self.cfg
    return trainer.train_model(
        name=name, folder=folder, module=model.module, params=model.params,
        arrays=arrays, spec=spec, optim=optim, seed=seed, mesh=self.mesh,
        batch_sharding=sharding.batch_sharding(self.mesh), resume=self.resume,
        every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep,
        log_every=c.log_every_steps, **teacher)

  def prune_done(self, folder: str) -> None:
    workspace.prune_done(folder, self.cfg.checkpoint.after_done)

  def finish_training(self, folder: str, fp: str, **info: Any) -> None:
    workspace.finish_training(folder, fp, self.cfg.checkpoint.after_done, **info)
