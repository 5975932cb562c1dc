"""Tests for first_jax.store: exact round trips, resumable writes, refusals, multi-host merge."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from first_jax import store
from first_jax.errors import UserError
from first_jax.store import (StoreReader, StoreSpec, StoreWriter, bytes_per_position, pack_bits,
                             store_size_bytes, unpack_bits, update_manifest)

_LP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _spec(**kw):
  base = dict(k=5, vocab_size=49152, seq_len=12, logprob_dtype="float16",
              teacher={"path": "teacher-a", "step": 3}, tokenizer_hash="tok1",
              data_fingerprint="data1")
  base.update(kw)
  return StoreSpec(**base)


def _batch(rng, spec, examples):
  n, L, K, V = len(examples), spec.seq_len, spec.k, spec.vocab_size
  ids = rng.integers(0, V, (n, L, K))
  ids.flat[:2] = [0, V - 1]  # the extremes of the id range
  return dict(example_idx_N=np.asarray(examples, np.int64),
              token_ids_NxL=rng.integers(0, V, (n, L)),
              ids_NxLxK=ids,
              logprobs_NxLxK=-rng.exponential(3.0, (n, L, K)).astype(np.float32),
              tail_logmass_NxL=-rng.exponential(5.0, (n, L)).astype(np.float32),
              mask_NxL=rng.random((n, L)) < 0.7)


def _write(writer, index, batch):
  return writer.write_shard(index, **batch)


def _expected(spec, batch):
  lp = _LP[spec.logprob_dtype]
  return {**batch, "logprobs_NxLxK": batch["logprobs_NxLxK"].astype(lp).astype(np.float32),
          "tail_logmass_NxL": batch["tail_logmass_NxL"].astype(lp).astype(np.float32)}


def _assert_equal(got, want, order=None):
  for key, value in want.items():
    value = np.asarray(value) if order is None else np.asarray(value)[order]
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _tmp_files(folder):
  return [f for f in os.listdir(folder) if f.startswith(".tmp-")]


# ---- bit packing --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 16, 18, 20, 31])
def test_pack_bits_matches_python_integer_reference(bits):
  rng = np.random.default_rng(bits)
  ids_RxM = rng.integers(0, 2**bits, (3, 11))
  packed = pack_bits(ids_RxM, bits)
  nbytes = (11 * bits + 7) // 8
  assert packed.shape == (3, nbytes) and packed.dtype == np.uint8
  for row, ids in zip(packed, ids_RxM):  # slow reference: one big little-endian integer
    big = sum(int(v) << (i * bits) for i, v in enumerate(ids))
    assert row.tobytes() == big.to_bytes(nbytes, "little")
  np.testing.assert_array_equal(unpack_bits(packed, bits, 11), ids_RxM)
  np.testing.assert_array_equal(store._unpack_bits_generic(packed, bits, 11), ids_RxM)
  np.testing.assert_array_equal(store._pack_bits_generic(ids_RxM, bits), packed)


# ---- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("logprob_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("vocab_size,k", [(v, k) for v in (2, 49152, 151936, 2**20)
                                          for k in (1, 5, 20) if k <= v])
def test_round_trip_exact(tmp_path, vocab_size, k, logprob_dtype):
  spec = _spec(vocab_size=vocab_size, k=k, logprob_dtype=logprob_dtype, seq_len=13)
  rng = np.random.default_rng(vocab_size + k)
  batch = _batch(rng, spec, np.arange(7) + 100)
  _write(StoreWriter(tmp_path, spec), 0, batch)
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 7
  got = reader.read(np.arange(7) + 100)
  _assert_equal(got, _expected(spec, batch))
  assert got["ids_NxLxK"].dtype == np.int32 and got["logprobs_NxLxK"].dtype == np.float32
  assert got["mask_NxL"].dtype == bool
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert m["id_bits"] == max(1, int(np.ceil(np.log2(vocab_size))))
  assert os.path.getsize(tmp_path / m["shards"][0]["file"]) == 7 * m["record_bytes"]


def test_id_bits_and_bytes_per_position():
  assert _spec(vocab_size=49152).id_bits == 16
  assert _spec(vocab_size=151936).id_bits == 18
  assert _spec(vocab_size=2**20).id_bits == 20
  spec = _spec(k=5, vocab_size=49152, seq_len=64)
  # 8 (example) + 64*2 (tokens) + 64*5*2 (ids) + 64*5*2 (log-probs) + 64*2 (tail) + 8 (mask)
  assert spec.record_bytes == 1552
  assert bytes_per_position(spec) == 24.25


def test_random_order_read_and_batches(tmp_path):
  spec = _spec()
  rng = np.random.default_rng(0)
  writer = StoreWriter(tmp_path, spec)
  batches = [_batch(rng, spec, np.arange(10) + 10 * i) for i in range(3)]
  batches.append(_batch(rng, spec, rng.permutation(np.arange(30, 45)) * 3))  # non-consecutive
  for i, b in enumerate(batches):
    _write(writer, i, b)
  assert writer._shards[0]["first_example"] == 10 * 0 and writer._shards[3]["first_example"] is None
  want = {k: np.concatenate([_expected(spec, b)[k] for b in batches]) for k in batches[0]}
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 45
  order = rng.permutation(45)[:20]
  _assert_equal(reader.read(want["example_idx_N"][order]), want, order)
  with pytest.raises(UserError, match="example index 31 not in store"):
    reader.read([0, 31])
  seen = [b["example_idx_N"] for b in reader.iter_batches(8, shuffle=True, seed=1)]
  assert [len(s) for s in seen] == [8] * 5 + [5]
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(want["example_idx_N"]))
  assert len(list(reader.iter_batches(8, drop_remainder=True))) == 5
  assert store_size_bytes(tmp_path) >= 45 * spec.record_bytes


# ---- resumable, atomic writes -------------------------------------------------------------


def test_rerun_skips_finished_and_rewrites_unfinished(tmp_path):
  spec = _spec()
  rng = np.random.default_rng(1)
  batches = [_batch(rng, spec, np.arange(6) + 6 * i) for i in range(4)]
  writer = StoreWriter(tmp_path, spec)
  for i in range(3):
    _write(writer, i, batches[i])
  (tmp_path / "shard-h000-00003.bin").write_bytes(b"partial")  # crashed before manifest entry
  mtimes = {i: os.stat(tmp_path / f"shard-h000-{i:05d}.bin").st_mtime_ns for i in range(3)}

  again = StoreWriter(tmp_path, spec)
  done = [i for i in range(4) if again.has_shard(i)]
  assert done == [0, 1, 2]
  for i in range(4):
    if not again.has_shard(i):
      _write(again, i, batches[i])
  assert {i: os.stat(tmp_path / f"shard-h000-{i:05d}.bin").st_mtime_ns for i in range(3)} == mtimes
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 24
  _assert_equal(reader.read(np.arange(18, 24)), _expected(spec, batches[3]))
  assert not _tmp_files(tmp_path)


def test_has_shard_false_when_file_damaged(tmp_path):
  spec = _spec()
  _write(StoreWriter(tmp_path, spec), 0, _batch(np.random.default_rng(2), spec, np.arange(4)))
  path = tmp_path / "shard-h000-00000.bin"
  data = bytearray(path.read_bytes())
  data[5] ^= 0xFF
  path.write_bytes(bytes(data))
  assert not StoreWriter(tmp_path, spec).has_shard(0)


@pytest.mark.parametrize("field,change", [
    ("data_fingerprint", {"data_fingerprint": "data2"}),
    ("tokenizer_hash", {"tokenizer_hash": "tok2"}),
    ("teacher", {"teacher": {"path": "teacher-b", "step": 3}}),
    ("k", {"k": 4}), ("vocab_size", {"vocab_size": 50000}), ("seq_len", {"seq_len": 11}),
    ("logprob_dtype", {"logprob_dtype": "bfloat16"}),
])
def test_mismatch_refused_naming_field(tmp_path, field, change):
  spec = _spec()
  _write(StoreWriter(tmp_path, spec), 0, _batch(np.random.default_rng(3), spec, np.arange(3)))
  with pytest.raises(UserError, match=rf"{field} differs \(store: .*, now: .*\)"):
    StoreWriter(tmp_path, _spec(**change))
  StoreWriter(tmp_path, _spec(teacher={"step": 3, "path": "teacher-a"}))  # same dict: accepted


def test_moved_teacher_export_keeps_the_store_but_another_teacher_does_not(tmp_path):
  rng = np.random.default_rng(5)
  spec = _spec(teacher={"export": "/a/teacher/export", "fingerprint": "f1"})
  _write(StoreWriter(tmp_path, spec), 0, _batch(rng, spec, [0, 1]))
  moved = StoreWriter(tmp_path, _spec(teacher={"export": "/b/teacher/export", "fingerprint": "f1"}))
  assert moved.has_shard(0)
  with pytest.raises(UserError, match="teacher differs"):
    StoreWriter(tmp_path, _spec(teacher={"export": "/a/teacher/export", "fingerprint": "f2"}))


def test_corrupted_and_truncated_shards_refused(tmp_path):
  spec = _spec()
  writer = StoreWriter(tmp_path, spec)
  rng = np.random.default_rng(4)
  for i in range(3):
    _write(writer, i, _batch(rng, spec, np.arange(5) + 5 * i))
  path = tmp_path / "shard-h000-00001.bin"
  good = path.read_bytes()
  bad = bytearray(good)
  bad[len(bad) // 2] ^= 0x01
  path.write_bytes(bytes(bad))
  with pytest.raises(UserError, match=r"shard-h000-00001\.bin: sha256 mismatch"):
    StoreReader(tmp_path)
  StoreReader(tmp_path, verify=False)  # size still right: only the checksum can tell
  path.write_bytes(good[:-3])
  with pytest.raises(UserError, match=r"shard-h000-00001\.bin: .*truncated"):
    StoreReader(tmp_path, verify=False)
  path.unlink()
  with pytest.raises(UserError, match=r"shard-h000-00001\.bin: missing"):
    StoreReader(tmp_path)


def test_crash_mid_write_leaves_manifest_and_folder_unchanged(tmp_path, monkeypatch):
  spec = _spec()
  rng = np.random.default_rng(5)
  writer = StoreWriter(tmp_path, spec)
  _write(writer, 0, _batch(rng, spec, np.arange(4)))
  before = (tmp_path / "manifest.json").read_bytes()
  monkeypatch.setattr(store, "_CHUNK_BYTES", 1)  # one row per chunk: the crash hits mid-file
  calls = []

  def failing_pack(ids, bits):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("simulated crash")
    return pack_bits(ids, bits)

  monkeypatch.setattr(store, "pack_bits", failing_pack)
  with pytest.raises(RuntimeError, match="simulated crash"):
    _write(writer, 1, _batch(rng, spec, np.arange(4, 8)))
  assert (tmp_path / "manifest.json").read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shard-h000-00000.bin"]
  assert StoreReader(tmp_path).num_examples == 4


def test_out_of_range_ids_refused(tmp_path):
  spec = _spec(vocab_size=1000)
  batch = _batch(np.random.default_rng(6), spec, np.arange(2))
  batch["ids_NxLxK"][0, 0, 0] = 1000
  with pytest.raises(UserError, match="store top ids"):
    _write(StoreWriter(tmp_path, spec), 0, batch)


def test_update_manifest_merges(tmp_path):
  spec = _spec()
  rng = np.random.default_rng(7)
  writer = StoreWriter(tmp_path, spec)
  _write(writer, 0, _batch(rng, spec, np.arange(3)))
  calib = {"temperature": 0.62, "mode": "prob_softmax", "ece_curve": [[0.5, 0.1], [0.62, 0.03]]}
  update_manifest(tmp_path, calibration=calib)
  update_manifest(tmp_path, note="second")
  _write(writer, 1, _batch(rng, spec, np.arange(3, 6)))  # the writer keeps foreign fields
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert m["calibration"] == calib and m["note"] == "second" and len(m["shards"]) == 2
  assert StoreReader(tmp_path).calibration == calib
  with pytest.raises(ValueError, match="shards"):
    update_manifest(tmp_path, shards=[])
  assert not _tmp_files(tmp_path)


def test_multi_host_finalize(tmp_path):
  spec = _spec()
  rng = np.random.default_rng(8)
  w0 = StoreWriter(tmp_path, spec, host_id=0, num_hosts=2)
  w1 = StoreWriter(tmp_path, spec, host_id=1, num_hosts=2)
  batches = {}
  for shard in range(4):  # data shard i goes to host i % 2
    batches[shard] = _batch(rng, spec, np.arange(5) + 5 * shard)
    _write([w0, w1][shard % 2], shard, batches[shard])
  assert sorted(f for f in os.listdir(tmp_path) if f.startswith("manifest")) == [
      "manifest-h000.json", "manifest-h001.json"]
  with pytest.raises(UserError, match="finalize"):
    StoreReader(tmp_path)
  with pytest.raises(UserError, match=r"manifest-h001\.json not complete"):
    w0.finalize(timeout_s=0.0)
  w1.finalize()
  w0.finalize(timeout_s=5.0)
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 20
  assert {s["file"] for s in reader.shards} == {
      "shard-h000-00000.bin", "shard-h001-00001.bin", "shard-h000-00002.bin",
      "shard-h001-00003.bin"}
  want = {k: np.concatenate([_expected(spec, batches[i])[k] for i in range(4)])
          for k in batches[0]}
  order = rng.permutation(20)
  _assert_equal(reader.read(order), want, order)
  assert StoreWriter(tmp_path, spec, host_id=1, num_hosts=2).has_shard(3)
  with pytest.raises(UserError, match="num_hosts differs"):
    StoreWriter(tmp_path, spec, host_id=0, num_hosts=1)
