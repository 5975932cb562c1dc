"""Tests for first_jax.data.store: exact round trips, resumable writes, refusals, multi-host merge."""
import hashlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.core.topk import TAIL_FLOOR
from first_jax.data import store
from first_jax.data.store import (bytes_per_example, bytes_per_scored_token, pack_bits,
                                  store_size_bytes, StoreReader, StoreSpec, StoreWriter, token_hash,
                                  unpack_bits, update_manifest)

_LP = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _spec(**kw):
  base = dict(k=5, vocab_size=49152, seq_len=12, positions=7, logprob_dtype="float16",
              teacher={"path": "teacher-a", "step": 3}, tokenizer_hash="tok1",
              data_fingerprint="data1")
  base.update(kw)
  return StoreSpec(**base)


def _mask(rng, n, L, P):
  """Random masks: row 0 scores nothing, row 1 exactly P positions, the rest 0..P at random."""
  counts = rng.integers(0, P + 1, n)
  counts[:2] = [0, P][:n]
  mask = np.zeros((n, L), bool)
  for r, c in enumerate(counts):
    mask[r, rng.choice(L, c, replace=False)] = True
  return mask


def _batch(rng, spec, examples):
  n, L, K, V = len(examples), spec.seq_len, spec.k, spec.vocab_size
  mask = _mask(rng, n, L, spec.scored_positions)
  ids = rng.integers(0, V, (n, L, K))
  if n > 1:  # the extremes of the id range, at row 1's scored positions
    scored = ids[1, mask[1]]
    scored.flat[:2] = [0, V - 1][:scored.size]
    ids[1, mask[1]] = scored
  return dict(example_idx_N=np.asarray(examples, np.int64),
              token_ids_NxL=rng.integers(0, V, (n, L)),
              ids_NxLxK=ids,
              logprobs_NxLxK=-rng.exponential(3.0, (n, L, K)).astype(np.float32),
              tail_logmass_NxL=-rng.exponential(5.0, (n, L)).astype(np.float32),
              mask_NxL=mask)


def _write(writer, index, batch):
  return writer.write_shard(index, **batch)


def _expected(spec, batch):
  """What read() returns, built position by position (a slow reference for the vectorised
  code)."""
  lp = _LP[spec.logprob_dtype]
  n, L, K = batch["ids_NxLxK"].shape
  ids = np.zeros((n, L, K), np.int32)
  logprobs = np.full((n, L, K), TAIL_FLOOR, np.float32)
  tail = np.zeros((n, L), np.float32)
  for r in range(n):
    for t in range(L):
      if batch["mask_NxL"][r, t]:
        ids[r, t] = batch["ids_NxLxK"][r, t]
        logprobs[r, t] = batch["logprobs_NxLxK"][r, t].astype(lp).astype(np.float32)
        tail[r, t] = np.float32(batch["tail_logmass_NxL"][r, t]).astype(lp).astype(np.float32)
  return {"example_idx_N": batch["example_idx_N"],
          "token_hash_N": token_hash(batch["token_ids_NxL"]), "ids_NxLxK": ids,
          "logprobs_NxLxK": logprobs, "tail_logmass_NxL": tail, "mask_NxL": batch["mask_NxL"]}


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
@pytest.mark.parametrize("positions", [0, 1, 5])
def test_round_trip_exact(tmp_path, vocab_size, k, logprob_dtype, positions):
  spec = _spec(vocab_size=vocab_size, k=k, logprob_dtype=logprob_dtype, seq_len=13,
               positions=positions)
  rng = np.random.default_rng(vocab_size + k + 1000 * positions)
  batch = _batch(rng, spec, np.arange(7) + 100)
  counts = batch["mask_NxL"].sum(1)
  assert counts[0] == 0 and counts[1] == spec.scored_positions and counts.max() <= counts[1]
  _write(StoreWriter(tmp_path, spec), 0, batch)
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 7
  got = reader.read(np.arange(7) + 100)
  want = _expected(spec, batch)
  _assert_equal(got, want)
  assert {k: v.dtype for k, v in got.items()} == {
      "example_idx_N": np.int64, "token_hash_N": np.uint64, "ids_NxLxK": np.int32,
      "logprobs_NxLxK": np.float32, "tail_logmass_NxL": np.float32, "mask_NxL": bool}
  # the stored values are the inputs (not zeros), exact up to the half-precision rounding
  m = batch["mask_NxL"]
  np.testing.assert_array_equal(got["ids_NxLxK"][m], batch["ids_NxLxK"][m])
  np.testing.assert_allclose(got["logprobs_NxLxK"][m], batch["logprobs_NxLxK"][m], rtol=1e-2)
  assert (got["logprobs_NxLxK"][m] < 0).all() and (got["logprobs_NxLxK"][~m] == TAIL_FLOOR).all()
  assert (got["ids_NxLxK"][~m] == 0).all() and (got["tail_logmass_NxL"][~m] == 0).all()
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert m["id_bits"] == max(1, int(np.ceil(np.log2(vocab_size))))
  assert m["positions"] == spec.scored_positions and "token_dtype" not in m
  assert os.path.getsize(tmp_path / m["shards"][0]["file"]) == 7 * m["record_bytes"]


def test_slots_past_the_count_are_zero_bytes(tmp_path):
  spec = _spec(vocab_size=1000, k=3, seq_len=20, positions=6)
  rng = np.random.default_rng(11)
  batch = _batch(rng, spec, np.arange(5))
  batch["mask_NxL"][2] = False
  batch["mask_NxL"][2, [3, 17]] = True  # two of six slots used
  _write(StoreWriter(tmp_path, spec), 0, batch)
  rec = np.fromfile(tmp_path / "shard-h000-00000.bin", np.uint8).reshape(5, spec.record_bytes)
  lay = spec.layout
  o, b = lay["example_idx"]
  assert rec[2, o:o + b].view("<i8")[0] == 2
  o, b = lay["token_hash"]
  assert rec[2, o:o + b].view("<u8")[0] == token_hash(batch["token_ids_NxL"][2:3])[0]
  o, b = lay["mask"]
  assert rec[2, o:o + b].tobytes() == (2**3 + 2**17).to_bytes(3, "little")
  o, b = lay["top_ids"]  # 10-bit ids: slots 0 and 1 fill 2 * 3 * 10 = 60 bits
  ids = unpack_bits(rec[2, o:o + b], spec.id_bits, 6 * 3).reshape(6, 3)
  np.testing.assert_array_equal(ids[:2], batch["ids_NxLxK"][2, [3, 17]])
  assert not ids[2:].any() and not (rec[2, o + 8:o + b]).any()
  o, b = lay["logprobs"]
  lp = rec[2, o:o + b].view("<f2").reshape(6, 3)
  np.testing.assert_array_equal(lp[:2], batch["logprobs_NxLxK"][2, [3, 17]].astype(np.float16))
  assert not rec[2, o + 2 * 3 * 2:o + b].any()
  o, b = lay["tail_logmass"]
  assert not rec[2, o + 2 * 2:o + b].any() and rec[2, o:o + 4].any()
  assert not rec[0, lay["top_ids"][0]:].any()  # row 0 scores nothing


def test_unscored_positions_do_not_change_the_bytes(tmp_path):
  spec = _spec(vocab_size=1000)
  rng = np.random.default_rng(12)
  batch = _batch(rng, spec, np.arange(6))
  messy = {k: np.array(v, copy=True) for k, v in batch.items()}
  off = ~batch["mask_NxL"]
  messy["ids_NxLxK"][off] = rng.integers(-5000, 5000, (off.sum(), spec.k))  # out of range too
  messy["logprobs_NxLxK"][off] = np.nan
  messy["tail_logmass_NxL"][off] = rng.normal(0, 1e6, off.sum())
  _write(StoreWriter(tmp_path / "a", spec), 0, batch)
  _write(StoreWriter(tmp_path / "b", spec), 0, messy)
  name = "shard-h000-00000.bin"
  assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  _assert_equal(StoreReader(tmp_path / "b").read(np.arange(6)), _expected(spec, batch))


def test_too_many_scored_positions_refused(tmp_path):
  spec = _spec(seq_len=12, positions=4)
  batch = _batch(np.random.default_rng(13), spec, [40, 41, 42])
  batch["mask_NxL"][2] = False
  batch["mask_NxL"][2, :5] = True
  with pytest.raises(UserError, match=r"store example 42: 5 scored positions, more than the "
                                      r"store's positions=4"):
    _write(StoreWriter(tmp_path, spec), 0, batch)
  assert not os.path.exists(tmp_path / "shard-h000-00000.bin") and not _tmp_files(tmp_path)
  batch["mask_NxL"][2, 4] = False  # exactly P: accepted
  _write(StoreWriter(tmp_path, spec), 0, batch)


@pytest.mark.parametrize("positions", [-1, 13])
def test_positions_out_of_range_refused(positions):
  with pytest.raises(UserError, match="store positions"):
    _spec(seq_len=12, positions=positions)


def test_positions_zero_means_seq_len(tmp_path):
  assert _spec(seq_len=12, positions=0).scored_positions == 12
  spec = _spec(seq_len=12, positions=0)
  _write(StoreWriter(tmp_path, spec), 0, _batch(np.random.default_rng(14), spec, [0, 1]))
  assert StoreWriter(tmp_path, _spec(seq_len=12, positions=12)).has_shard(0)  # same store
  assert StoreReader(tmp_path).spec.record_bytes == spec.record_bytes


def test_token_hash():
  rng = np.random.default_rng(15)
  tok = rng.integers(0, 151936, (4, 96))
  tok[2] = tok[0]
  h = token_hash(tok)
  assert h.dtype == np.uint64 and h.shape == (4,)
  assert h[0] == h[2] and len(set(h.tolist())) == 3
  np.testing.assert_array_equal(token_hash(tok.astype(np.int32)), h)  # dtype-independent
  np.testing.assert_array_equal(token_hash(tok[::-1]), h[::-1])
  for t in (0, 50, 95):  # one token changed, anywhere in the row
    other = tok.copy()
    other[1, t] += 1
    changed = token_hash(other)
    assert changed[1] != h[1] and (np.delete(changed, 1) == np.delete(h, 1)).all()
  want = hashlib.blake2b(tok[3].astype("<i4").tobytes(), digest_size=8).digest()
  assert int(h[3]) == int.from_bytes(want, "little")  # pinned: stable across runs and machines
  assert token_hash(np.zeros((0, 8), np.int32)).shape == (0,)
  with pytest.raises(ValueError, match="token_hash"):
    token_hash(tok[0])


def test_id_bits_and_record_bytes():
  assert _spec(vocab_size=49152).id_bits == 16
  assert _spec(vocab_size=151936).id_bits == 18
  assert _spec(vocab_size=2**20).id_bits == 20
  mc = _spec(k=5, vocab_size=49152, seq_len=96, positions=1)
  # 8 (example) + 8 (hash) + 96/8 (mask) + 1*5*2 (ids) + 1*5*2 (log-probs) + 1*2 (tail)
  assert mc.record_bytes == bytes_per_example(mc) == 50 and bytes_per_scored_token(mc) == 50
  ir = _spec(k=5, vocab_size=49152, seq_len=512, positions=256)
  assert ir.record_bytes == 8 + 8 + 64 + 256 * 10 + 256 * 10 + 256 * 2 == 5712
  assert bytes_per_scored_token(ir) == 5712 / 256
  odd = _spec(k=3, vocab_size=151936, seq_len=13, positions=5)  # 18-bit ids, 13-bit mask
  assert odd.layout == {"example_idx": (0, 8), "token_hash": (8, 8), "mask": (16, 2),
                        "top_ids": (18, 34), "logprobs": (52, 30), "tail_logmass": (82, 10)}
  sizes = []
  for p in range(1, 14):
    s = _spec(k=3, vocab_size=151936, seq_len=13, positions=p)
    offsets = list(s.layout.values())
    assert all(o == po + pn for (o, _), (po, pn) in zip(offsets[1:], offsets))
    assert s.record_bytes == sum(n for _, n in offsets) == offsets[-1][0] + offsets[-1][1]
    sizes.append(s.record_bytes)
  assert all(a < b for a, b in zip(sizes, sizes[1:]))  # grows with P, shrinks as P drops


def test_random_order_read_and_batches(tmp_path):
  spec = _spec()
  rng = np.random.default_rng(0)
  writer = StoreWriter(tmp_path, spec)
  batches = [_batch(rng, spec, np.arange(10) + 10 * i) for i in range(3)]
  batches.append(_batch(rng, spec, rng.permutation(np.arange(30, 45)) * 3))  # non-consecutive
  for i, b in enumerate(batches):
    _write(writer, i, b)
  assert writer._shards[0]["first_example"] == 10 * 0 and writer._shards[3]["first_example"] is None
  expected = [_expected(spec, b) for b in batches]
  want = {k: np.concatenate([e[k] for e in expected]) for k in expected[0]}
  reader = StoreReader(tmp_path)
  assert reader.num_examples == 45
  order = rng.permutation(45)[:20]
  _assert_equal(reader.read(want["example_idx_N"][order]), want, order)
  with pytest.raises(UserError, match="example index 31 not in store"):
    reader.read([0, 31])
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
    ("positions", {"positions": 6}),
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
  r, t = 1, np.nonzero(batch["mask_NxL"][1])[0][-1]
  batch["ids_NxLxK"][r, t, 0] = 1000
  with pytest.raises(UserError, match="store top ids"):
    _write(StoreWriter(tmp_path, spec), 0, batch)
  batch["ids_NxLxK"][r, t, 0] = -1
  with pytest.raises(UserError, match="store top ids"):
    _write(StoreWriter(tmp_path, spec), 0, batch)


def test_version_1_store_refused(tmp_path):
  spec = _spec()
  _write(StoreWriter(tmp_path, spec), 0, _batch(np.random.default_rng(16), spec, np.arange(3)))
  path = tmp_path / "manifest.json"
  m = json.loads(path.read_text())
  m["format_version"] = 1
  m["token_dtype"] = "uint16"
  del m["positions"]
  path.write_text(json.dumps(m))
  with pytest.raises(UserError) as e:
    StoreReader(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and "version 1" in msg and "version 2" in msg
  assert "re-run extract into a new store dir" in msg and "delete" in msg
  with pytest.raises(UserError, match=r"format_version differs \(store: 1, now: 2\); use a new "
                                      r"store dir or delete it"):
    StoreWriter(tmp_path, spec)


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
  expected = [_expected(spec, batches[i]) for i in range(4)]
  want = {k: np.concatenate([e[k] for e in expected]) for k in expected[0]}
  order = rng.permutation(20)
  _assert_equal(reader.read(order), want, order)
  assert StoreWriter(tmp_path, spec, host_id=1, num_hosts=2).has_shard(3)
  with pytest.raises(UserError, match="num_hosts differs"):
    StoreWriter(tmp_path, spec, host_id=0, num_hosts=1)
