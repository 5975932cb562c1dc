"""The one batched inference loop: a jitted program over every row of a dataset, on one host
or many (the floor under extraction, calibration and evaluation).

    out = map_rows(fn, params, arrays, keys=..., batch_size=32, mesh=mesh, desc="score")

Rows are cut into GLOBAL batches of `batch_size` (optionally shortest first, each batch's
padding cut to a bucket: `data.trim_batch`, exact for a causal model). In a multi-process run
every process holds the same arrays (the data is loaded everywhere) and feeds only its own
contiguous part of each global batch (`jax.make_array_from_process_local_data`), so hosts read
no rows twice and agree on every batch's shape; the outputs, laid out over the batch axis
(`out_shardings`), come back as this process's rows and are either gathered to every process
(`multihost_utils.process_allgather`: evaluation reports, the calibration search) or kept
local (extraction: each process writes its own store shards).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from first_jax.runtime import log as log_lib, sharding
from first_jax.runtime.errors import UserError
from first_jax.core import sampled, step, topk
from first_jax.data import batches as data_lib
from first_jax import models


def teacher_topk(params: Any, batch: dict[str, jax.Array], *, apply: step.Apply, k: int,
                 answer_only: bool = False, mesh=None) -> dict[str, jax.Array]:
  """Extraction: teacher forward and top-k in one program (the logits never leave the device).

  With `answer_only` the head and top-k run at each row's answer position only (the one
  position a response-only MCQA loss uses); the other positions hold id 0, log-prob
  TAIL_FLOOR and tail 0 (they are masked out of every loss). With a `mesh` whose "tensor" axis
  splits the vocabulary, the top-k is taken vocab-parallel (`step.teacher_topk`).
  """
  if not answer_only:
    return step.teacher_topk(apply(params, batch["input_ids"], batch["attention_mask"]), k, mesh)
  top = step.teacher_topk(
      step.student_logits(params, batch, apply, step.LossSpec(answer_only=True)), k, mesh)
  return at_answer_positions(top, batch)


def at_answer_positions(top: dict[str, jax.Array], batch) -> dict[str, jax.Array]:
  """[B, 1, ...] targets of the answer positions -> [B, L, ...], the other positions holding
  id 0, log-prob TAIL_FLOOR and tail 0 (masked out of every loss)."""
  b, l = batch["input_ids"].shape
  at_B1 = (jnp.arange(l)[None, :] == batch["answer_pos"][:, None])  # [B, L]
  fill = {"teacher_logprobs": topk.TAIL_FLOOR, "teacher_ids": 0, "teacher_tail": 0.0}
  out = {}
  for key, x in top.items():  # [B, 1, ...] -> [B, L, ...], placed at the answer position
    shape = (b, l) + x.shape[2:]
    mask = at_B1.reshape((b, l) + (1,) * (x.ndim - 2))
    out[key] = jnp.where(mask, jnp.broadcast_to(x, shape), jnp.asarray(fill[key], x.dtype))
  return out


def teacher_sample(params: Any, batch: dict[str, jax.Array], *, apply: step.Apply, num: int,
                   t: float, seed: int, answer_only: bool = False) -> dict[str, jax.Array]:
  """Sampled extraction: teacher forward and a priority sample of `num` tokens of
  softmax(logits / t) per position (`step.teacher_sampled`), in one program. Position j of
  the example `example_id` draws from key (seed, example_id, j): the draw does not depend on
  the batch, its padding, the hosts or a resume. Layout as `teacher_topk`."""
  spec = step.LossSpec(answer_only=answer_only)
  keys_BxP = sampled.position_keys(seed, batch["example_id"], step.sample_positions(batch, spec))
  top = step.teacher_sampled(step.student_logits(params, batch, apply, spec), num, t, keys_BxP)
  return at_answer_positions(top, batch) if answer_only else top


def topk_program(module, params: Any, k: int, answer_only: bool, mesh) -> Callable:
  """The jitted extraction program of `module` with `params`' layout: forward + top-k, outputs
  split over the batch."""
  return jit(functools.partial(teacher_topk, apply=models.apply_fn(module), k=k,
                               answer_only=answer_only, mesh=mesh), params, mesh)


def sample_program(module, params: Any, num: int, t: float, seed: int, answer_only: bool,
                   mesh) -> Callable:
  """The jitted sampled-extraction program (`teacher_sample`), outputs split over the batch."""
  return jit(functools.partial(teacher_sample, apply=models.apply_fn(module), num=num, t=t,
                               seed=seed, answer_only=answer_only), params, mesh)


def jit(fn: Callable, params: Any, mesh) -> Callable:
  """`fn(params, batch) -> {name: [B, ...]}` jitted with explicit layouts: `params` as they are
  placed (arrays or ShapeDtypeStructs with shardings), every batch entry and every output split
  over the batch axis."""
  bs = sharding.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(jax.tree.map(lambda x: x.sharding, params), bs),
                 out_shardings=bs)


def _local(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array (all rows on one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, sharding.batch_sharding(mesh).spec))


def map_rows(fn: Callable, params: Any, arrays: dict[str, np.ndarray], *, keys: Sequence[str],
             batch_size: int, mesh, desc: str, length_buckets: Sequence[int] = (),
             shortest_first: bool = False, gather: bool = True) -> dict[str, np.ndarray]:
  """`fn(params, {k: batch[k] for k in keys})` over every row of `arrays`.

  Returns {output name: [N, ...]} in the rows' order, plus "row" [N] (int64) — with
  gather=False only this process's rows (each row is computed by exactly one process; their
  "row" says which). [B, L] entries are trimmed with `length_buckets` (per global batch).
  """
  n = len(arrays[keys[0]])
  hosts, me = jax.process_count(), jax.process_index()
  if batch_size % hosts:
    raise UserError(f"batch_size: {batch_size} does not split over {hosts} processes")
  per_host = batch_size // hosts
  order = (np.argsort(arrays["attention_mask"].sum(-1), kind="stable") if shortest_first
           else np.arange(n))
  rows = {k: arrays[k][order] for k in keys}
  rows["__row"] = order.astype(np.int64)
  batches = data_lib.BatchIterator(rows, batch_size, seed=0, shuffle=False,
                                   drop_remainder=False, num_epochs=1)
  bs = sharding.batch_sharding(mesh)
  outs = []
  for b in log_lib.progress(batches, desc=desc, total=-(-n // batch_size)):
    b = data_lib.trim_batch(b, length_buckets)
    mine = slice(me * per_host, (me + 1) * per_host)
    dev = {k: jax.make_array_from_process_local_data(bs, np.ascontiguousarray(b[k][mine]))
           for k in keys}
    out = {k: _local(v, mesh) for k, v in fn(params, dev).items()}
    out["__row"], out["__valid"] = b["__row"][mine], b["valid"][mine]
    if gather and hosts > 1:
      out = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
             for k, v in out.items()}
    outs.append(out)
  cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  keep = cat.pop("__valid") > 0
  row = cat.pop("__row")[keep]
  back = np.argsort(row, kind="stable")  # the rows' own order
  result = {k: v[keep][back] for k, v in cat.items()}
  result["row"] = row[back]
  return result


def topk_rows(fn, params, arrays: dict, batch_size: int, mesh, desc: str,
             gather: bool = True, by_example: bool = False) -> dict[str, np.ndarray]:
  """Teacher top-k (`topk_program`), or with `by_example` a sample (`sample_program`, which
  also reads the rows' example_id), over the rows of `arrays` (`map_rows`; gather=False: this
  process's rows only, their indices in "row")."""
  names = ("input_ids", "attention_mask", "answer_pos") + (("example_id",) if by_example else ())
  keys = [k for k in names if k in arrays]
  return map_rows(fn, params, arrays, keys=keys, batch_size=batch_size, mesh=mesh,
                        desc=desc, gather=gather)
