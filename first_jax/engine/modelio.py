"""The teacher's and student's weights: started (pre-trained, a layer subset, or random) and
loaded sharded on the mesh, exported in Hugging Face format."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from first_jax.runtime import distributed, io_util, sharding
from first_jax.runtime.errors import UserError
from first_jax.data import assets
from first_jax import models


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What starting or loading the teacher or the student needs, from its config block."""
  who: str  # "teacher" or "student": names the config keys in errors
  init: str  # random, pretrained or layer_subset
  source: str  # the checkpoint a pretrained / layer_subset start reads: a path or an asset
  source_is_asset: bool  # `source` names a model asset, fetched into the cache when first read
  layers: tuple[int, ...]  # layer_subset: the teacher layers kept
  model: dict  # the `model` block: the architecture of a random start; dtypes and remat
  seed: int  # a random start's
  on_indivisible: str  # `mesh.on_indivisible`

  def config(self) -> models.ModelConfig:
    return models.ModelConfig.from_dict(self.model, prefix=f"{self.who}.model")


def with_params(model: models.Model, params: Any) -> models.Model:
  return models.Model(model.config, params)


def _load(path: str, spec: ModelSpec, mesh) -> models.Model:
  return models.load_pretrained(path, mesh=mesh, dtype=spec.model["dtype"],
                                param_dtype=spec.model["param_dtype"],
                                remat=spec.model["remat"], on_indivisible=spec.on_indivisible)


def init_model(spec: ModelSpec, mesh, tok) -> models.Model:
  """The pre-trained (or random) starting point of the teacher or student, sharded on `mesh`.

  For init=pretrained/layer_subset the architecture comes from the checkpoint; of the `model`
  block only dtype, param_dtype and remat apply.
  """
  if spec.init == "random":
    mc = spec.config()
    if mc.vocab_size < len(tok):
      raise UserError(f"config.{spec.who}.model.vocab_size: expected >= the tokenizer's "
                      f"{len(tok)}, got {mc.vocab_size}")
    example = [jax.ShapeDtypeStruct((1, 8), np.int32)]
    params = sharding.init_sharded(models.Decoder(mc), mesh, sharding.DEFAULT_RULES,
                                   jax.random.key(spec.seed), example, spec.on_indivisible)
    return models.Model(mc, params)
  source = str(assets.fetch(spec.source)) if spec.source_is_asset else spec.source
  model = _load(source, spec, mesh)
  if spec.init == "layer_subset":
    if not spec.layers:
      raise UserError(f"config.{spec.who}.layers: expected teacher layer indices for "
                      f"layer_subset")
    model = models.Model(*models.layer_subset(model.config, model.params, list(spec.layers)))
  return model


def load_export(path: str, spec: ModelSpec, mesh) -> models.Model:
  """The model a training stage exported into `path` (a stage folder's export/)."""
  path = os.path.join(path, "export")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise UserError(f"{path}: no exported model (run the stage that writes it first)")
  return _load(path, spec, mesh)


def export(model: models.Model, tok, path: str) -> None:
  """HF-format model (config.json + model.safetensors) plus its tokenizer, for serving.
  A model with a non-finite parameter is refused (never exported, so never marked done)."""
  finite = jax.tree.map(lambda x: bool(jax.numpy.isfinite(x).all()), model.params)
  bad = [jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_leaves_with_path(finite)
         if not ok]
  if bad:
    raise UserError(f"{path}: not exported, non-finite parameters in {', '.join(bad[:3])}")
  if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    model = models.Model(model.config, multihost_utils.process_allgather(model.params, tiled=True))
  if distributed.is_main():
    # a killed export's temp files (the workdir is locked): io_util's, and safetensors' own
    # (save_file writes <dir>/.tmpXXXXXX, then renames it)
    io_util.remove_stale_temps(path, ".tmp-*", ".tmp" + "[0-9A-Za-z]" * 6)
    models.save_pretrained(model, path)
    tok.save_pretrained(path)
  distributed.sync(f"export:{path}")
