"""Training batches through Grain (the MaxText / nanodo loader), with `BatchIterator`'s contract.

    batches = GrainBatches(arrays, batch_size=64, seed=3, length_buckets=(128, 256, 512),
                           process_index=jax.process_index(), process_count=jax.process_count())
    for batch in batches: ...          # this process's rows of each global batch
    saved = batches.state()            # {"epoch", "index"}: JSON, the same as BatchIterator's
    batches.restore(saved)             # continues exactly

The pipeline is a `grain.MapDataset` (random access by global batch number g), so a position
is one integer and a resume is exact by construction:

    rows(g)        the global batch's example rows; order="native": epoch e visits rows in
                   rng([seed, e]).permutation(N) with `BatchIterator`'s length buckets, so the
                   batches are identical to BatchIterator's; order="grain": Grain's own
                   `range(N).shuffle(seed).batch(B).repeat()` (index_shuffle, no buckets)
    .map(local)    pads the last batch (`valid`), keeps THIS process's contiguous B/P rows and
                   gathers only those rows from `arrays` (a host reads only its own slice)
    .map(fn)       optional per-batch work on the local rows (e.g. the top-k store's targets,
                   `train.store_targets`), run in Grain's prefetch threads
    .map(trim)     optional: cut padding to the GLOBAL batch's bucket (`data.trim_batch`), so
                   every process agrees on the shape
    .to_iter_dataset(ReadOptions(num_threads, prefetch))   Grain's threaded prefetch

`state()` is `{"epoch": g // batches_per_epoch, "index": g % batches_per_epoch}` (the
`BatchIterator` format: checkpoints move between the two loaders); the Grain iterator's own
state `{"next_index": g}` is `grain_state()`, and `iterator` can also be saved with Grain's Orbax
handler (`grain.checkpoint.CheckpointSave(batches.iterator)`).

`StoreSource` is the top-k store as a Grain random-access source.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from first_jax import data as data_lib
from first_jax import store as store_lib
from first_jax.errors import UserError

ORDERS = ("native", "grain")


epoch_order = data_lib.epoch_order  # BatchIterator's order


class _NativeRows(grain.MapDataset):
  """Element g: the rows of global batch g (epoch g // per_epoch), BatchIterator's order."""

  def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, per_epoch: int,
               num_epochs: int | None, lengths_N: np.ndarray | None,
               length_buckets: Sequence[int]):
    super().__init__()
    self._n, self._b, self._seed, self._shuffle = n, batch_size, seed, shuffle
    self._per_epoch, self._lengths, self._buckets = per_epoch, lengths_N, tuple(length_buckets)
    self._len = sys.maxsize if num_epochs is None else per_epoch * num_epochs
    self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()  # Grain's prefetch threads read batches concurrently

  def __len__(self) -> int:
    return self._len

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._orders:
        self._orders[epoch] = (epoch_order(self._n, self._b, self._seed, epoch, self._lengths,
                                           self._buckets)
                               if self._shuffle else np.arange(self._n))
        while len(self._orders) > 2:
          self._orders.popitem(last=False)
      return self._orders[epoch]

  def __getitem__(self, g):
    if isinstance(g, slice):
      return self.slice(g)
    epoch, i = divmod(g, self._per_epoch)
    return self._order(epoch)[i * self._b:(i + 1) * self._b]

  def __str__(self) -> str:
    return f"_NativeRows(n={self._n}, batch_size={self._b})"


class _LocalRows:
  """Global batch rows -> this process's part of the batch, gathered from `arrays`."""

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, process_index: int,
               process_count: int, lengths_N: np.ndarray | None, trim: Sequence[int]):
    self._arrays, self._b, self._trim = arrays, batch_size, tuple(trim)
    per = batch_size // process_count
    self._mine = slice(process_index * per, (process_index + 1) * per)
    self._lengths = lengths_N

  def __call__(self, rows) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, np.int64).reshape(-1)
    valid_B = np.zeros(self._b, np.float32)
    valid_B[:len(rows)] = 1.0
    rows = np.concatenate([rows, np.full(self._b - len(rows), rows[0], rows.dtype)])
    mine = rows[self._mine]
    batch = {k: a[mine] for k, a in self._arrays.items()}
    batch["valid"] = valid_B[self._mine]
    if self._trim:  # the GLOBAL batch's longest row decides (processes agree on the shape)
      batch["__longest"] = int(self._lengths[rows].max())
    return batch


def _trim(buckets: Sequence[int]) -> Callable[[dict], dict]:
  def cut(batch: dict) -> dict:
    batch = dict(batch)
    longest = batch.pop("__longest")
    length = batch["input_ids"].shape[1]
    keep = min([b for b in buckets if b >= longest] + [length])
    return {k: (v[:, :keep] if np.ndim(v) >= 2 and v.shape[1] == length else v)
            for k, v in batch.items()}
  return cut


class GrainBatches:
  """`data.BatchIterator`'s contract on a Grain pipeline, split over processes.

  Same arguments as BatchIterator, plus:
    process_index, process_count: this process's part of each global batch: rows
      [p * B/P, (p + 1) * B/P) (the `infer.map_rows` convention, for
      `jax.make_array_from_process_local_data`); defaults 0, 1 (the whole batch).
    order: "native" (BatchIterator's batches, exactly) or "grain" (Grain's index_shuffle; no
      length buckets).
    map_fn: run on each local batch inside the pipeline (prefetch threads), e.g. the store's
      targets `train.store_targets(reader)`, which then reads only this process's rows; it sees
      the untrimmed rows.
    trim: cut each batch's padding to the global batch's bucket (`data.trim_batch` semantics
      with `length_buckets`, but identical on every process).
    num_threads, prefetch: Grain ReadOptions (0, 0: synchronous, no threads).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
               shuffle: bool = True, drop_remainder: bool = True, num_epochs: int | None = None,
               length_buckets: Sequence[int] = (), *, process_index: int = 0,
               process_count: int = 1, order: str = "native",
               map_fn: Callable[[dict], dict] | None = None, trim: bool = False,
               num_threads: int = 2, prefetch: int = 4):
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or "valid" in arrays:
      raise UserError("data: arrays must share their leading size and not contain 'valid'")
    n = sizes.pop()
    if batch_size < 1 or n < 1 or (drop_remainder and n < batch_size):
      raise UserError(f"data.batch_size: {batch_size} does not fit {n} examples "
                      f"(drop_remainder={drop_remainder})")
    if not 0 <= process_index < process_count or batch_size % process_count:
      raise UserError(f"data.batch_size: {batch_size} does not split over {process_count} "
                      f"processes (process {process_index})")
    if order not in ORDERS:
      raise UserError(f"data.order: expected one of {ORDERS}, got {order!r}")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.num_epochs = num_epochs
    self.batches_per_epoch = data_lib.num_steps(n, batch_size, 1, drop_remainder)
    self.length_buckets = tuple(sorted(length_buckets))
    if self.length_buckets and not (shuffle and drop_remainder):
      raise UserError("data.length_buckets: only for shuffled training batches")
    if self.length_buckets and order == "grain":
      raise UserError("data.length_buckets: Grain has no length-bucketed batching; use "
                      "order='native'")
    if trim and not self.length_buckets:
      raise UserError("data.trim: needs length_buckets")
    if (self.length_buckets or trim) and "attention_mask" not in arrays:
      raise UserError("data.length_buckets: needs an attention_mask")
    lengths_N = (np.asarray(arrays["attention_mask"]).sum(-1) if self.length_buckets else None)
    if order == "native":
      rows: grain.MapDataset = _NativeRows(n, batch_size, seed, shuffle, self.batches_per_epoch,
                                           num_epochs, lengths_N, self.length_buckets)
    else:
      rows = grain.MapDataset.range(n)
      if shuffle:
        rows = rows.shuffle(seed=seed % 2**32)
      rows = rows.batch(batch_size, drop_remainder=drop_remainder).repeat(num_epochs)
    ds = rows.map(_LocalRows(dict(arrays), batch_size, process_index, process_count, lengths_N,
                             self.length_buckets if trim else ()))
    if map_fn is not None:
      ds = ds.map(map_fn)
    if trim:
      ds = ds.map(_trim(self.length_buckets))
    self.dataset = ds
    self.iterator = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)).__iter__()

  def grain_state(self) -> dict[str, Any]:
    """The Grain iterator's own state ({"next_index": global batch number})."""
    return self.iterator.get_state()

  def state(self) -> dict[str, int]:
    g = int(self.iterator.get_state()["next_index"])
    return {"epoch": g // self.batches_per_epoch, "index": g % self.batches_per_epoch}

  def restore(self, state: Mapping[str, int]) -> None:
    if "next_index" in state:  # a Grain state
      g = int(state["next_index"])
      if g < 0:
        raise UserError(f"data state: {dict(state)} is not a position of this iterator")
    else:
      epoch, index = int(state["epoch"]), int(state["index"])
      if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
        raise UserError(f"data state: {dict(state)} is not a position of this iterator")
      g = epoch * self.batches_per_epoch + index
    try:
      self.iterator.set_state({"next_index": g})
    except IndexError as e:  # past num_epochs
      raise UserError(f"data state: {dict(state)}: {e}") from None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self.iterator)

  def close(self) -> None:
    self.iterator.close()


def _per_record(key: str) -> str:
  """"ids_NxLxK" -> "ids_LxK", "token_hash_N" -> "token_hash" (one record: no N)."""
  name, shape = key.rsplit("_", 1)
  return name if shape == "N" else f"{name}_{shape[2:]}"


class StoreSource:
  """The top-k store as a Grain random-access source (`grain.MapDataset.source(...)`).

  Record i is the i-th stored example in example-index order ({example_idx, token_hash, ids_LxK,
  logprobs_LxK, tail_logmass_L, mask_L}); `_getitems` reads many in one `StoreReader.read` (Grain's
  batched-read protocol). `read(example_ids)` is the batch read by example index (for `map_fn`).
  Pickles as its folder, so multiprocess prefetch workers re-open the store (no copy of the
  memory maps).
  """

  def __init__(self, store_dir: str | os.PathLike, verify: bool = False):
    self.store_dir, self._verify = os.fspath(store_dir), verify
    self.reader = store_lib.StoreReader(self.store_dir, verify=verify)

  def __len__(self) -> int:
    return self.reader.num_examples

  def read(self, example_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    return self.reader.read(example_ids)

  def _records(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    ids = self.reader.example_indices[np.asarray(indices, np.int64)]
    rec = self.reader.read(ids)
    names = {k: _per_record(k) for k in rec}
    return [{names[k]: v[j] for k, v in rec.items()} for j in range(len(ids))]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._records([index])[0]

  def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return self._records(indices)

  def __repr__(self) -> str:
    return f"StoreSource({self.store_dir!r})"

  def __getstate__(self) -> dict:
    return {"store_dir": self.store_dir, "verify": self._verify}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["store_dir"], verify=False)

