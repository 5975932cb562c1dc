"""GrainBatches (bench/grain_batches.py, the evaluation of Grain for issue 14): BatchIterator's
contract on a Grain pipeline — exact resume, every example once an epoch, length buckets,
per-process slices of the global batch, the top-k store as a Grain source, Grain's own Orbax
handler, and a killed `fit` resuming. Skipped where grain is not installed (an optional extra)."""
import functools
import json
import os
import pickle

import numpy as np
import pytest

grain = pytest.importorskip("grain")

from bench import grain_batches as grain_data  # noqa: E402
from first_jax import data  # noqa: E402
from first_jax.errors import UserError  # noqa: E402


@pytest.fixture
def rng(request):
  seed = int(np.random.SeedSequence().entropy % 2**32)
  print(f"{request.node.name}: seed {seed}")  # shown with a failure: rerun with this seed
  return np.random.default_rng(seed)


def _arrays(rng, n, length=40):
  lengths = rng.integers(3, length + 1, size=n)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1, 100, size=(n, length)), 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "example_id": np.arange(n),
          "x": rng.normal(size=(n, 3)).astype(np.float32),
          "teacher_logprobs": rng.normal(size=(n, length, 2)).astype(np.float32)}


def _equal(got, want):
  assert got.keys() == want.keys(), (sorted(got), sorted(want))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _take(it, count):
  return [next(it) for _ in range(count)]


@pytest.mark.parametrize("kw", [{}, {"length_buckets": (16, 24, 40)},
                                {"shuffle": False, "drop_remainder": False, "num_epochs": 1}])
def test_native_order_is_batch_iterator_exactly(rng, kw):
  n, b, seed = int(rng.integers(40, 120)), int(rng.integers(3, 9)), int(rng.integers(2**31))
  arrays = _arrays(rng, n)
  ref = data.BatchIterator(arrays, b, seed=seed, **kw)
  got = grain_data.GrainBatches(arrays, b, seed=seed, **kw)
  assert got.batches_per_epoch == ref.batches_per_epoch
  count = ref.batches_per_epoch * 5 // 2 if kw.get("num_epochs") is None else None
  want = _take(ref, count) if count else list(ref)
  mine = _take(got, count) if count else list(got)
  assert len(mine) == len(want)
  for g, w in zip(mine, want):
    _equal(g, w)
  assert got.state() == ref.state()


@pytest.mark.parametrize("order", grain_data.ORDERS)
@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_end"])
def test_resume_continues_exactly(rng, order, stop):
  n, b = int(rng.integers(30, 90)), int(rng.integers(2, 7))
  arrays, seed = _arrays(rng, n), int(rng.integers(2**31))
  make = functools.partial(grain_data.GrainBatches, arrays, b, seed=seed, order=order)
  per = make().batches_per_epoch
  unbroken = _take(make(), 3 * per + 2)
  at = per + int(rng.integers(1, per)) if stop == "mid_epoch" and per > 1 else per
  it = make()
  _take(it, at)
  saved = json.loads(json.dumps(it.state()))  # as checkpointed (ocp.args.JsonSave)
  assert saved == {"epoch": at // per, "index": at % per}
  for state in (saved, json.loads(json.dumps(it.grain_state()))):
    resumed = make()
    _take(resumed, 2)  # a used iterator: restore must drop its position and prefetch buffer
    resumed.restore(state)
    for want in unbroken[at:]:  # crosses at least one epoch boundary
      _equal(next(resumed), want)
  with pytest.raises(UserError, match="data state"):
    make().restore({"epoch": 0, "index": per + 1})


def test_batch_iterator_positions_restore_into_grain_and_back(rng):
  arrays = _arrays(rng, 50)
  ref = data.BatchIterator(arrays, 4, seed=7, length_buckets=(16, 40))
  _take(ref, 17)
  got = grain_data.GrainBatches(arrays, 4, seed=7, length_buckets=(16, 40))
  got.restore(ref.state())  # a checkpoint written by the hand-written loader
  for _ in range(15):
    _equal(next(got), next(ref))
  back = data.BatchIterator(arrays, 4, seed=7, length_buckets=(16, 40))
  back.restore(got.state())
  _equal(next(back), next(got))


@pytest.mark.parametrize("order", grain_data.ORDERS)
def test_every_example_once_per_epoch(rng, order):
  n, b = int(rng.integers(20, 80)), int(rng.integers(3, 8))
  arrays = _arrays(rng, n)
  padded = list(grain_data.GrainBatches(arrays, b, seed=1, order=order, drop_remainder=False,
                                        num_epochs=2))
  per = -(-n // b)
  assert len(padded) == 2 * per
  for e in range(2):
    ep = padded[e * per:(e + 1) * per]
    real = np.concatenate([x["example_id"][x["valid"] > 0] for x in ep])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    assert all(x["example_id"].shape == (b,) for x in ep)
    for x in ep:  # rows and their data stay together
      np.testing.assert_array_equal(x["x"], arrays["x"][x["example_id"]])
  dropped = grain_data.GrainBatches(arrays, b, seed=1, order=order)
  ep = np.concatenate([next(dropped)["example_id"] for _ in range(n // b)])
  assert len(set(ep.tolist())) == len(ep) == n // b * b
  first = np.concatenate([x["example_id"] for x in padded[:per]])
  second = np.concatenate([x["example_id"] for x in padded[per:]])
  assert not np.array_equal(first, second)  # reshuffled each epoch


def test_epoch_multisets_match_batch_iterator(rng):
  b = int(rng.integers(2, 7))
  n = b * int(rng.integers(5, 15))  # no remainder: every example in every epoch
  arrays = _arrays(rng, n)
  for order in grain_data.ORDERS:
    got = grain_data.GrainBatches(arrays, b, seed=3, order=order)
    ref = data.BatchIterator(arrays, b, seed=3)
    for _ in range(2):
      mine = np.concatenate([next(got)["example_id"] for _ in range(n // b)])
      want = np.concatenate([next(ref)["example_id"] for _ in range(n // b)])
      np.testing.assert_array_equal(np.sort(mine), np.sort(want))
  # with a remainder the epoch's multiset (valid rows) is still the same
  arrays = _arrays(rng, n + 1)
  mine = list(grain_data.GrainBatches(arrays, b, seed=3, order="grain", drop_remainder=False,
                                      num_epochs=1))
  want = list(data.BatchIterator(arrays, b, seed=3, drop_remainder=False, num_epochs=1))
  ids = lambda bs: np.sort(np.concatenate([x["example_id"][x["valid"] > 0] for x in bs]))
  np.testing.assert_array_equal(ids(mine), ids(want))


def test_length_buckets_honoured_and_trim_agrees_across_processes(rng):
  arrays = _arrays(rng, 203)
  buckets, b = (16, 24, 40), 8
  lengths = arrays["attention_mask"].sum(-1)
  whole = grain_data.GrainBatches(arrays, b, seed=5, length_buckets=buckets)
  parts = [grain_data.GrainBatches(arrays, b, seed=5, length_buckets=buckets, trim=True,
                                   process_index=p, process_count=4) for p in range(4)]
  widths = []
  for _ in range(whole.batches_per_epoch):
    g = next(whole)
    cut = data.trim_batch(g, buckets)
    w = cut["input_ids"].shape[1]
    widths.append(w)
    assert lengths[g["example_id"]].max() <= w  # nothing real is cut
    local = [next(p) for p in parts]
    assert {x["input_ids"].shape[1] for x in local} == {w}  # every process: the global width
    _equal({k: np.concatenate([x[k] for x in local]) for k in local[0]}, cut)
  plain = grain_data.GrainBatches(arrays, b, seed=5)
  plain_w = [data.trim_batch(next(plain), buckets)["input_ids"].shape[1]
             for _ in range(plain.batches_per_epoch)]
  assert set(widths) <= set(buckets) and np.mean(widths) < np.mean(plain_w)
  with pytest.raises(UserError, match="Grain has no length-bucketed batching"):
    grain_data.GrainBatches(arrays, b, seed=5, length_buckets=buckets, order="grain")


@pytest.mark.parametrize("order", grain_data.ORDERS)
@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_partition_the_global_batch(rng, order, count):
  n, b = int(rng.integers(30, 90)), 4 * int(rng.integers(1, 3))  # 4 or 8: not over 3
  arrays = _arrays(rng, n)
  kw = dict(seed=9, order=order, drop_remainder=False, num_epochs=2)
  whole = list(grain_data.GrainBatches(arrays, b, **kw))
  parts = [list(grain_data.GrainBatches(arrays, b, process_index=p, process_count=count, **kw))
           for p in range(count)]
  assert all(len(p) == len(whole) for p in parts)
  for i, g in enumerate(whole):
    local = [p[i] for p in parts]
    assert all(len(x["example_id"]) == b // count for x in local)
    _equal({k: np.concatenate([x[k] for x in local]) for k in g}, g)
  with pytest.raises(UserError, match="does not split over 3 processes"):
    grain_data.GrainBatches(arrays, b, seed=9, process_index=0, process_count=3)


def test_state_is_global_so_a_resume_may_change_the_process_count(rng):
  arrays = _arrays(rng, 64)
  two = grain_data.GrainBatches(arrays, 8, seed=2, process_index=1, process_count=2)
  _take(two, 11)
  saved = two.state()
  four = [grain_data.GrainBatches(arrays, 8, seed=2, process_index=p, process_count=4)
          for p in range(4)]
  ref = data.BatchIterator(arrays, 8, seed=2)
  ref.restore(saved)
  for p in four:
    p.restore(saved)
  for _ in range(10):
    want = next(ref)
    local = [next(p) for p in four]
    _equal({k: np.concatenate([x[k] for x in local]) for k in want}, want)


def test_prefetch_threads_change_neither_batches_nor_state(rng):
  arrays = _arrays(rng, 90)
  sync = grain_data.GrainBatches(arrays, 6, seed=4, num_threads=0, prefetch=0)
  threaded = grain_data.GrainBatches(arrays, 6, seed=4, num_threads=4, prefetch=16)
  for i in range(40):
    _equal(next(threaded), next(sync))
    assert threaded.state() == sync.state()  # consumed, not prefetched
  threaded.close()


# ---------------------------------------------------------------------------- the store


def _store(tmp_path, rng, n, L=40):
  from first_jax.store import StoreSpec, StoreWriter
  spec = StoreSpec(k=3, vocab_size=128, seq_len=L, positions=L, teacher={"path": "t"},
                   tokenizer_hash="tok", data_fingerprint="d")
  arrays = _arrays(rng, n, L)
  writer = StoreWriter(tmp_path, spec)
  for s, a in enumerate(range(0, n, 16)):
    sl = slice(a, a + 16)
    m = len(arrays["example_id"][sl])
    writer.write_shard(s, arrays["example_id"][sl], arrays["input_ids"][sl],
                       rng.integers(0, 128, (m, L, 3)),
                       -rng.exponential(2.0, (m, L, 3)).astype(np.float32),
                       -rng.exponential(4.0, (m, L)).astype(np.float32),
                       arrays["attention_mask"][sl] > 0)
  writer.finalize()
  return arrays


def test_store_is_a_grain_source_and_feeds_only_local_rows(tmp_path, rng):
  from first_jax import store, train
  n = 70
  arrays = _store(tmp_path, rng, n)
  src = grain_data.StoreSource(tmp_path)
  reader = store.StoreReader(tmp_path)
  ds = grain.MapDataset.source(src)
  assert len(ds) == n
  pick = rng.permutation(n)[:9]
  full = reader.read(pick)
  for j, i in enumerate(pick):
    rec = ds[int(i)]
    assert set(rec) == {"example_idx", "token_hash", "ids_LxK", "logprobs_LxK",
                        "tail_logmass_L", "mask_L"}
    np.testing.assert_array_equal(rec["ids_LxK"], full["ids_NxLxK"][j])
    np.testing.assert_array_equal(rec["logprobs_LxK"], full["logprobs_NxLxK"][j])
  batched = list(ds.batch(16).to_iter_dataset(grain.ReadOptions(num_threads=0)))
  np.testing.assert_array_equal(np.concatenate([x["example_idx"] for x in batched]),
                                np.arange(n))
  again = pickle.loads(pickle.dumps(src))  # as a multiprocess worker gets it
  assert len(pickle.dumps(src)) < 1000 and len(again) == n

  reads = []
  counting = store.StoreReader(tmp_path)
  counting.read = lambda ids, _r=counting.read: reads.append(len(ids)) or _r(ids)
  add = train.store_targets(counting)  # as train.py builds it, run inside the pipeline
  parts = [grain_data.GrainBatches(arrays, 8, seed=1, process_index=p, process_count=2,
                                   map_fn=add, num_threads=0, prefetch=0) for p in range(2)]
  whole = data.BatchIterator(arrays, 8, seed=1)
  want_add = train.store_targets(reader)
  for _ in range(12):
    want = want_add(next(whole))
    local = [next(p) for p in parts]
    _equal({k: np.concatenate([x[k] for x in local]) for k in want}, want)
  assert reads == [4] * 24  # each process read its own 4 rows of each global batch of 8


# -------------------------------------------------------------- checkpoints: Orbax, fit


def test_grain_orbax_handler_saves_the_iterator_beside_a_state(tmp_path, rng):
  import orbax.checkpoint as ocp
  arrays = _arrays(rng, 40)
  make = lambda: grain_data.GrainBatches(arrays, 4, seed=8)
  unbroken = _take(make(), 25)
  it = make()
  _take(it, 13)
  mgr = ocp.CheckpointManager(str(tmp_path / "ck"))
  mgr.save(13, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)}),
                                       data=grain.checkpoint.CheckpointSave(it.iterator),
                                       position=ocp.args.JsonSave(it.state())))
  mgr.wait_until_finished()
  files = [f for f in os.listdir(tmp_path / "ck" / "13" / "data") if f.endswith(".json")]
  assert files == ["process_0-of-1.json"], files  # Grain's file, one per process
  fresh = make()
  out = mgr.restore(13, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"w": np.zeros(3)}),
      data=grain.checkpoint.CheckpointRestore(fresh.iterator),
      position=ocp.args.JsonRestore()))
  mgr.close()
  assert out["position"] == {"epoch": 1, "index": 3} == fresh.state()
  for want in unbroken[13:]:
    _equal(next(fresh), want)


def test_killed_fit_resumes_exactly_with_grain_batches(tmp_path):
  from tests import test_trainer

  def run(folder, total, kill_after=None, loader="grain"):
    arrays = test_trainer.arrays()
    batches = (grain_data.GrainBatches(arrays, 4, seed=3) if loader == "grain"
               else data.BatchIterator(arrays, 4, seed=3))  # 6 batches an epoch
    return test_trainer.run(folder, total, kill_after=kill_after, batches=batches)

  total = 14  # crosses two epoch boundaries
  run(str(tmp_path / "native"), total, loader="native")
  with pytest.raises(KeyboardInterrupt):
    run(str(tmp_path / "g"), total, kill_after=10)  # last checkpoint: step 8
  run(str(tmp_path / "g"), total)
  a = test_trainer.losses_by_step(str(tmp_path / "native"))
  b = test_trainer.losses_by_step(str(tmp_path / "g"))
  assert sorted(a) == sorted(b) == list(range(1, total + 1))
  for s in a:  # the same batches as BatchIterator's, and a killed run resumes exactly
    assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
