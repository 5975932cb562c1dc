"""The top-k store: the teacher's top-k ids and log-probs at the scored positions, as records.

A store folder holds
  manifest.json                      spec, record layout, shard list, later a `calibration` block
  manifest-h{host:03d}.json          multi-host only: each host's own part (merged by finalize())
  shard-h{host:03d}-{index:05d}.bin  N records, no header (shapes come from the manifest)

Only the positions that carry a loss (the row's mask) are stored: at most P = `positions` per
row (0: P = L). One record per example row (little-endian, fields back to back):
  example_idx   int64             maps the record back to its data row
  token_hash    uint64            token_hash() of the row's token ids (the trainer compares it
                                  with its batch's; the ids themselves are not stored)
  mask          [L] one bit each (np.packbits, little bit order): the scored positions
  top_ids       [P*K] packed in id_bits = ceil(log2(vocab_size)) bits each, least significant first
  logprobs      [P, K] float16 | bfloat16 (`logprob_dtype`)
  tail_logmass  [P] same dtype: log of the probability outside the top-k
A sampled store (manifest key `sampling`, first_jax.core.sampled) has the same records: its K
slots hold a priority sample's ids and their exact log-probabilities at the sampling
temperature, and tail_logmass holds log tau, the sample's threshold.
Slot j of top_ids / logprobs / tail_logmass holds the row's j-th scored position (the mask's set
bits in increasing order); slots past the row's count are zero bytes. Records have a fixed size,
so row r of a shard sits at byte r * record_bytes (np.memmap). read() puts the values back at
their positions, dense over L; elsewhere id 0, log-prob TAIL_FLOOR, tail 0.0.

Size (k=5, vocab 49,152 = 16-bit ids, float16; bytes_per_example / bytes_per_scored_token):
  L=96,  P=1   (multiple choice, one answer position):   50 B/example,   50.0 B/scored token
  L=512, P=256 (instruction responses):                5712 B/example,   22.3 B/scored token
Format version 1 stored every position plus the token ids, ~24.2 B x L: 2324 B (L=96, 46x
more) and 12360 B (L=512, 2.2x more) per example. The reference code's JSONL ({"token_id":
value} dict per position) takes ~150 B/position: ~6.7x more per scored token than P=256 here.

Letters: N examples, L positions, P stored (scored) positions, K kept tokens.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from first_jax.runtime.errors import UserError
from first_jax.runtime.io_util import (atomic_path, atomic_write_json, remove_stale_temps,
                                       sha256_file)
from first_jax.core.topk import TAIL_FLOOR

FORMAT = "first_jax.topk_store"
VERSION = 2
MANIFEST = "manifest.json"
_LOGPROB_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Fields a re-run must agree on; anything else (calibration, complete) may change.
_SPEC_FIELDS = ("format_version", "k", "vocab_size", "seq_len", "positions", "logprob_dtype",
                "teacher", "tokenizer_hash", "data_fingerprint", "num_hosts", "sampling")
_STRUCTURAL = frozenset(_SPEC_FIELDS + ("format", "id_bits", "record_bytes", "layout",
                                        "shards"))
_CHUNK_BYTES = 64 << 20  # bound on the gather / bit-expansion buffers while packing a shard


def _json_normal(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class StoreSpec:
  """What a store holds and what produced it (all must match on a re-run)."""
  k: int
  vocab_size: int
  seq_len: int
  positions: int = 0  # P: the most scored (mask) positions any record holds; 0 means seq_len
  logprob_dtype: str = "float16"
  teacher: dict = dataclasses.field(default_factory=dict)  # e.g. model path, step, weights hash
  tokenizer_hash: str = ""
  data_fingerprint: str = ""
  # {} : top-k records. A sampled store (first_jax.core.sampled) says how it drew, e.g.
  # {"sampler": "priority", "temperature": 2.78, "mode": "log_space", "seed": 0}: its K slots
  # hold a priority sample's ids and exact log-probs at that temperature, and tail_logmass
  # holds log tau, the sample's threshold.
  sampling: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not 2 <= self.vocab_size <= 2**31:
      raise UserError(f"store vocab_size: expected 2..2**31, got {self.vocab_size}")
    if not 1 <= self.k <= self.vocab_size:
      raise UserError(f"store k: expected 1..vocab_size, got {self.k}")
    if self.seq_len < 1:
      raise UserError(f"store seq_len: expected >= 1, got {self.seq_len}")
    if not 0 <= self.positions <= self.seq_len:
      raise UserError(f"store positions: expected 0..seq_len={self.seq_len} (0: seq_len), got "
                      f"{self.positions}")
    if self.logprob_dtype not in _LOGPROB_DTYPES:
      raise UserError(f"store logprob_dtype: expected one of {sorted(_LOGPROB_DTYPES)}, "
                      f"got {self.logprob_dtype!r}")
    for name in ("teacher", "sampling"):
      try:
        object.__setattr__(self, name, _json_normal(dict(getattr(self, name))))
      except TypeError as e:
        raise UserError(f"store {name}: expected a JSON-serialisable dict ({e})") from None

  @property
  def id_bits(self) -> int:
    return max(1, (self.vocab_size - 1).bit_length())

  @property
  def scored_positions(self) -> int:
    """P in effect: `positions`, or seq_len when it is 0."""
    return self.positions or self.seq_len

  @property
  def layout(self) -> dict[str, tuple[int, int]]:
    """Field name -> (byte offset, byte count) inside one record."""
    L, P, K = self.seq_len, self.scored_positions, self.k
    sizes = [("example_idx", 8), ("token_hash", 8), ("mask", (L + 7) // 8),
             ("top_ids", (P * K * self.id_bits + 7) // 8), ("logprobs", P * K * 2),
             ("tail_logmass", P * 2)]
    out, offset = {}, 0
    for name, n in sizes:
      out[name] = (offset, n)
      offset += n
    return out

  @property
  def record_bytes(self) -> int:
    return sum(n for _, n in self.layout.values())

  @classmethod
  def from_manifest(cls, m: dict) -> StoreSpec:
    return cls(k=m["k"], vocab_size=m["vocab_size"], seq_len=m["seq_len"],
               positions=m["positions"], logprob_dtype=m["logprob_dtype"], teacher=m["teacher"],
               tokenizer_hash=m["tokenizer_hash"], data_fingerprint=m["data_fingerprint"],
               sampling=m.get("sampling") or {})


def bytes_per_example(spec: StoreSpec) -> int:
  """Stored bytes per example row (the record size), for reports."""
  return spec.record_bytes


def bytes_per_scored_token(spec: StoreSpec) -> float:
  """Stored bytes per scored position when a row fills all P slots (record size / P)."""
  return spec.record_bytes / spec.scored_positions


def token_hash(token_ids_NxL: np.ndarray) -> np.ndarray:
  """uint64 [N]: a 64-bit hash of each row's token ids (as little-endian int32).

  blake2b (8-byte digest) per row: deterministic across runs, machines and the ids' integer
  dtype. ~10 us per 2048-token row.
  """
  x = np.asarray(token_ids_NxL)
  if x.ndim != 2 or not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
    raise ValueError(f"token_hash: expected integer ids [N, L], got {x.dtype} {x.shape}")
  if x.size and x.dtype.itemsize > 4 and (x.min() < -2**31 or x.max() >= 2**31):
    raise ValueError("token_hash: token ids outside the int32 range")
  rows = np.ascontiguousarray(x, "<i4")
  digests = b"".join(hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in rows)
  return np.frombuffer(digests, "<u8").astype(np.uint64).reshape(len(rows))


def store_size_bytes(store_dir: str | os.PathLike) -> int:
  """Bytes on disk of a store's shards and manifests."""
  paths = glob.glob(os.path.join(store_dir, "shard-h*.bin"))
  paths += glob.glob(os.path.join(store_dir, "manifest*.json"))
  return sum(os.path.getsize(p) for p in paths)


# ---- bit packing --------------------------------------------------------------------------


def pack_bits(ids: np.ndarray, bits: int) -> np.ndarray:
  """Packs non-negative ints [..., M] into uint8 [..., ceil(M * bits / 8)], LSB first per row."""
  ids = np.asarray(ids)
  if bits in (8, 16):  # byte-aligned: the packed form is the little-endian integer itself
    return ids.astype(f"<u{bits // 8}").view(np.uint8).reshape(*ids.shape[:-1], -1)
  return _pack_bits_generic(ids, bits)


def _pack_bits_generic(ids: np.ndarray, bits: int) -> np.ndarray:
  shifts = np.arange(bits, dtype=np.uint64)
  bits_xMxb = ((ids.astype(np.uint64)[..., None] >> shifts) & 1).astype(np.uint8)
  flat = bits_xMxb.reshape(*ids.shape[:-1], ids.shape[-1] * bits)
  return np.packbits(flat, axis=-1, bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of pack_bits: uint8 [..., nbytes] -> uint32 [..., count]."""
  buf = np.ascontiguousarray(buf, dtype=np.uint8)
  if bits in (8, 16):
    n = count * bits // 8
    return buf[..., :n].copy().view(f"<u{bits // 8}").astype(np.uint32)
  return _unpack_bits_generic(buf, bits, count)


def _unpack_bits_generic(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
  # Gather the (at most 5) bytes that cover each id's bit window, then shift and mask:
  # memory O(count * 5) instead of expanding every bit.
  start = np.arange(count, dtype=np.int64) * bits
  byte0, shift = start >> 3, (start & 7).astype(np.uint64)
  nb = (bits + 7 + 7) // 8
  padded = np.concatenate([buf, np.zeros((*buf.shape[:-1], nb), np.uint8)], axis=-1)
  acc = np.zeros((*buf.shape[:-1], count), np.uint64)
  for j in range(nb):  # over bytes of one id, not over ids
    acc |= padded[..., byte0 + j].astype(np.uint64) << np.uint64(8 * j)
  return ((acc >> shift) & np.uint64((1 << bits) - 1)).astype(np.uint32)


# ---- records ------------------------------------------------------------------------------


def _slots(mask_NxL: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, position, slot) of every set mask bit; slot = its rank within the row."""
  row, pos = np.nonzero(mask_NxL)
  slot = (np.cumsum(mask_NxL, axis=1, dtype=np.int64) - 1)[row, pos]
  return row, pos, slot


def _encode(spec: StoreSpec, example_idx_N, token_ids_NxL, ids_NxLxK, logprobs_NxLxK,
            tail_logmass_NxL, mask_NxL) -> np.ndarray:
  """Arrays of N examples -> uint8 [N, record_bytes]; the caller checked counts and ranges."""
  n, P, K = len(example_idx_N), spec.scored_positions, spec.k
  lp_dtype = _LOGPROB_DTYPES[spec.logprob_dtype]
  mask_NxL = np.asarray(mask_NxL).astype(bool)
  row, pos, slot = _slots(mask_NxL)
  ids_NxPxK = np.zeros((n, P, K), np.int64)
  ids_NxPxK[row, slot] = np.asarray(ids_NxLxK)[row, pos]
  lp_NxPxK = np.zeros((n, P, K), np.float32)
  lp_NxPxK[row, slot] = np.asarray(logprobs_NxLxK, np.float32)[row, pos]
  tail_NxP = np.zeros((n, P), np.float32)
  tail_NxP[row, slot] = np.asarray(tail_logmass_NxL, np.float32)[row, pos]

  def half(x):
    return x.reshape(n, -1).astype(lp_dtype).view("<u2").view(np.uint8)

  parts = {
      "example_idx": np.asarray(example_idx_N).astype("<i8").reshape(n, 1).view(np.uint8),
      "token_hash": token_hash(token_ids_NxL).astype("<u8").reshape(n, 1).view(np.uint8),
      "mask": np.packbits(mask_NxL, axis=-1, bitorder="little"),
      "top_ids": pack_bits(ids_NxPxK.reshape(n, P * K), spec.id_bits),
      "logprobs": half(lp_NxPxK),
      "tail_logmass": half(tail_NxP),
  }
  rec_NxR = np.empty((n, spec.record_bytes), np.uint8)
  for name, (offset, nbytes) in spec.layout.items():
    rec_NxR[:, offset:offset + nbytes] = parts[name].reshape(n, nbytes)
  return rec_NxR


def _decode(spec: StoreSpec, rec_NxR: np.ndarray) -> dict[str, np.ndarray]:
  """uint8 [N, record_bytes] -> dict of dense arrays over L (int32 ids, float32 log-probs)."""
  n, L, P, K = rec_NxR.shape[0], spec.seq_len, spec.scored_positions, spec.k
  lp_dtype = _LOGPROB_DTYPES[spec.logprob_dtype]
  field = {name: np.ascontiguousarray(rec_NxR[:, o:o + b]) for name, (o, b) in spec.layout.items()}

  def half(x, shape):
    return x.view("<u2").astype(np.uint16).view(lp_dtype).astype(np.float32).reshape(shape)

  mask_NxL = np.unpackbits(field["mask"], axis=-1, count=L, bitorder="little").astype(bool)
  row, pos, slot = _slots(mask_NxL)
  if slot.size and slot.max() >= P:
    raise UserError(f"store: a record's mask has more than positions={P} scored positions "
                    "(corrupted shard); re-run extract")
  ids_NxPxK = unpack_bits(field["top_ids"], spec.id_bits, P * K).astype(np.int32)
  ids_NxLxK = np.zeros((n, L, K), np.int32)
  ids_NxLxK[row, pos] = ids_NxPxK.reshape(n, P, K)[row, slot]
  logprobs_NxLxK = np.full((n, L, K), TAIL_FLOOR, np.float32)
  logprobs_NxLxK[row, pos] = half(field["logprobs"], (n, P, K))[row, slot]
  tail_NxL = np.zeros((n, L), np.float32)
  tail_NxL[row, pos] = half(field["tail_logmass"], (n, P))[row, slot]
  return {
      "example_idx_N": field["example_idx"].view("<i8").astype(np.int64).reshape(n),
      "token_hash_N": field["token_hash"].view("<u8").astype(np.uint64).reshape(n),
      "ids_NxLxK": ids_NxLxK,
      "logprobs_NxLxK": logprobs_NxLxK,
      "tail_logmass_NxL": tail_NxL,
      "mask_NxL": mask_NxL,
  }


# ---- manifest -----------------------------------------------------------------------------


def _shard_name(host: int, index: int) -> str:
  return f"shard-h{host:03d}-{index:05d}.bin"


def _part_name(host: int) -> str:
  return f"manifest-h{host:03d}.json"


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable JSON manifest ({e})") from None


def _header(spec: StoreSpec, num_hosts: int) -> dict:
  # `positions` is the P in effect, so 0 and seq_len name the same store.
  return {"format": FORMAT, "format_version": VERSION, "k": spec.k, "vocab_size": spec.vocab_size,
          "seq_len": spec.seq_len, "positions": spec.scored_positions, "id_bits": spec.id_bits,
          "logprob_dtype": spec.logprob_dtype, "record_bytes": spec.record_bytes,
          "layout": {k: list(v) for k, v in spec.layout.items()}, "teacher": spec.teacher,
          "tokenizer_hash": spec.tokenizer_hash, "data_fingerprint": spec.data_fingerprint,
          "num_hosts": num_hosts,
          # a top-k store's manifest has no such key (as before sampled stores existed)
          **({"sampling": spec.sampling} if spec.sampling else {})}


def _short(v: Any) -> str:
  s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
  return s if len(s) <= 60 else s[:57] + "..."


def _identity(field: str, value: Any) -> Any:
  # The teacher's export path says where it lived, not what it is (its fingerprint does): a
  # workdir moved or linked elsewhere keeps its store.
  if field == "teacher" and isinstance(value, dict):
    return {k: v for k, v in value.items() if k != "export"}
  return value


def _check_same(store_dir: str, old: dict, new: dict) -> None:
  for f in _SPEC_FIELDS:
    if _identity(f, old.get(f)) != _identity(f, new.get(f)):
      raise UserError(f"store {store_dir}: {f} differs (store: {_short(old.get(f))}, now: "
                      f"{_short(new.get(f))}); use a new store dir or delete it")


def read_manifest(store_dir: str | os.PathLike) -> dict | None:
  """The store's manifest.json for done-checks: None when absent or unreadable (the stage that
  writes it decides what to do; `StoreReader` refuses a damaged one with one line)."""
  try:
    with open(os.path.join(store_dir, MANIFEST)) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return None
  return m if isinstance(m, dict) else None


def search_key(mode: str, tail: str) -> str:
  """Key of one temperature search in the manifest's calibration block ("log_space-bucket")."""
  return f"{mode}-{tail}"


def update_manifest(store_dir: str | os.PathLike, **fields: Any) -> dict:
  """Sets top-level manifest fields (e.g. calibration={...}), keeping the rest; atomic."""
  path = os.path.join(store_dir, MANIFEST)
  m = _read_json(path)
  if m is None:
    raise UserError(f"{path}: no store manifest (run extract first)")
  if bad := sorted(_STRUCTURAL.intersection(fields)):
    raise ValueError(f"update_manifest: {bad} describe the records and are not updatable")
  m.update(_json_normal(fields))
  remove_stale_temps(store_dir, f".tmp-{MANIFEST}-*")  # a killed update's (process 0 writes it)
  atomic_write_json(path, m)
  return m


class StoreWriter:
  """Writes one host's shards; re-runs skip finished shards.

  Single host: manifest.json is rewritten (atomically) after each shard. Multi-host: each host
  records its shards in its own manifest-h{host:03d}.json; every host calls finalize() at the end
  and host 0's finalize() waits for all parts to be marked complete, then merges them into
  manifest.json (the store folder must be shared between hosts).
  """

  def __init__(self, store_dir: str | os.PathLike, spec: StoreSpec, host_id: int = 0,
               num_hosts: int = 1):
    if not 0 <= host_id < num_hosts:
      raise UserError(f"store host_id: expected 0..{num_hosts - 1}, got {host_id}")
    self.store_dir, self.spec = os.fspath(store_dir), spec
    self.host_id, self.num_hosts = host_id, num_hosts
    os.makedirs(self.store_dir, exist_ok=True)
    self._header = _header(spec, num_hosts)
    self._path = os.path.join(self.store_dir,
                              MANIFEST if num_hosts == 1 else _part_name(host_id))
    # what a killed write of this host's shards or manifests left (only this host writes them)
    remove_stale_temps(self.store_dir, f".tmp-shard-h{host_id:03d}-*",
                       f".tmp-{os.path.basename(self._path)}-*",
                       *([f".tmp-{MANIFEST}-*"] if host_id == 0 else []))
    self._shards: dict[int, dict] = {}
    for p in {self._path, os.path.join(self.store_dir, MANIFEST)}:
      m = _read_json(p)
      if m is not None:
        _check_same(self.store_dir, m, self._header)
        self._shards.update({s["index"]: s for s in m.get("shards", [])
                             if s["host"] == host_id})
    self._verified: set[int] = set()

  def has_shard(self, index: int) -> bool:
    """True if shard `index` is recorded in the manifest and its file's sha256 matches."""
    entry = self._shards.get(index)
    if entry is None:
      return False
    if index not in self._verified:
      path = os.path.join(self.store_dir, entry["file"])
      if not (os.path.exists(path) and os.path.getsize(path) == entry["bytes"]
              and sha256_file(path) == entry["sha256"]):
        return False
      self._verified.add(index)
    return True

  def write_shard(self, index: int, example_idx_N: np.ndarray, token_ids_NxL: np.ndarray,
                  ids_NxLxK: np.ndarray, logprobs_NxLxK: np.ndarray,
                  tail_logmass_NxL: np.ndarray, mask_NxL: np.ndarray) -> dict:
    """Writes shard `index` (temp file + rename), then records it in the manifest.

    Only the positions set in mask_NxL are stored (at most spec.positions per row); the other
    positions' values are ignored (neither stored nor checked). token_ids_NxL is stored as its
    token_hash() only.

    Returns the manifest entry {file, host, index, num_records, first_example, bytes, sha256};
    first_example is set when the example indices are consecutive (then nothing is read to map
    them), else None.
    """
    spec, n = self.spec, len(example_idx_N)
    L, P, K = spec.seq_len, spec.scored_positions, spec.k
    example_idx_N = np.asarray(example_idx_N, np.int64)
    shapes = {"token_ids_NxL": (token_ids_NxL, (n, L)), "ids_NxLxK": (ids_NxLxK, (n, L, K)),
              "logprobs_NxLxK": (logprobs_NxLxK, (n, L, K)),
              "tail_logmass_NxL": (tail_logmass_NxL, (n, L)), "mask_NxL": (mask_NxL, (n, L))}
    for name, (x, shape) in shapes.items():
      if np.shape(x) != shape:
        raise ValueError(f"write_shard {name}: expected shape {shape}, got {np.shape(x)}")
    mask_NxL = np.asarray(mask_NxL).astype(bool)
    count_N = mask_NxL.sum(axis=1)
    if (over := np.nonzero(count_N > P)[0]).size:
      r = over[0]
      raise UserError(f"store example {example_idx_N[r]}: {count_N[r]} scored positions, more "
                      f"than the store's positions={P} (raise the store's positions)")
    _check_range("store top ids", np.asarray(ids_NxLxK)[mask_NxL], spec.vocab_size)
    if len(np.unique(example_idx_N)) != n:
      raise ValueError("write_shard example_idx_N: indices repeat within the shard")

    name = _shard_name(self.host_id, index)
    path = os.path.join(self.store_dir, name)
    # Per row: the [P, K] gathers (int64 ids, float32 log-probs) and the bit expansion.
    rows = max(1, _CHUNK_BYTES // max(1, P * K * (12 + spec.id_bits) + 8 * L))
    h = hashlib.sha256()
    with atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        for a in range(0, n, rows):
          s = slice(a, a + rows)
          data = _encode(spec, example_idx_N[s], np.asarray(token_ids_NxL)[s],
                         np.asarray(ids_NxLxK)[s], np.asarray(logprobs_NxLxK)[s],
                         np.asarray(tail_logmass_NxL)[s], mask_NxL[s]).tobytes()
          h.update(data)
          f.write(data)
    consecutive = n > 0 and np.array_equal(example_idx_N, example_idx_N[0] + np.arange(n))
    entry = {"file": name, "host": self.host_id, "index": int(index), "num_records": n,
             "first_example": int(example_idx_N[0]) if consecutive else None,
             "bytes": n * spec.record_bytes, "sha256": h.hexdigest()}
    self._shards[int(index)] = entry
    self._verified.add(int(index))
    self._save(complete=False)
    return entry

  def _save(self, complete: bool) -> None:
    m = _read_json(self._path) or {}
    m.update(self._header)
    m["shards"] = sorted(self._shards.values(), key=lambda s: s["index"])
    m["complete"] = complete
    atomic_write_json(self._path, m)

  def finalize(self, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
    """Marks this host's shards complete; on host 0 merges all parts into manifest.json."""
    self._save(complete=True)
    if self.num_hosts == 1 or self.host_id != 0:
      return
    deadline = time.monotonic() + timeout_s
    while True:
      parts = [_read_json(os.path.join(self.store_dir, _part_name(h)))
               for h in range(self.num_hosts)]
      missing = [_part_name(h) for h, p in enumerate(parts) if not (p and p.get("complete"))]
      if not missing:
        break
      if time.monotonic() > deadline:
        raise UserError(f"store {self.store_dir}: {', '.join(missing)} not complete after "
                        f"{timeout_s:.0f} s (did every host run finalize()?)")
      time.sleep(poll_s)
    for p in parts:
      _check_same(self.store_dir, p, self._header)
    path = os.path.join(self.store_dir, MANIFEST)
    m = _read_json(path) or {}
    m.update(self._header)
    m["shards"] = sorted((s for p in parts for s in p["shards"]),
                         key=lambda s: (s["host"], s["index"]))
    m["complete"] = True
    atomic_write_json(path, m)


def _check_range(what: str, x: np.ndarray, upper: int) -> None:
  x = np.asarray(x)
  if x.size and (x.min() < 0 or x.max() >= upper):
    raise UserError(f"{what}: values in [{x.min()}, {x.max()}], expected [0, {upper}) "
                    f"(does the spec's vocab_size match the teacher?)")


class StoreReader:
  """Random access to a finished store's records by example index."""

  def __init__(self, store_dir: str | os.PathLike, verify: bool = True):
    self.store_dir = os.fspath(store_dir)
    path = os.path.join(self.store_dir, MANIFEST)
    m = _read_json(path)
    if m is None:
      hint = " (multi-host parts found: run finalize() on host 0)" if glob.glob(
          os.path.join(self.store_dir, "manifest-h*.json")) else " (run extract first)"
      raise UserError(f"{path}: no store manifest{hint}")
    if m.get("format") != FORMAT or m.get("format_version") != VERSION:
      raise UserError(f"{path}: expected {FORMAT} version {VERSION}, got {m.get('format')} "
                      f"version {m.get('format_version')}; re-run extract into a new store dir "
                      "(or delete this one)")
    self.manifest, self.spec = m, StoreSpec.from_manifest(m)
    self.shards: list[dict] = m["shards"]
    self._maps: list[np.memmap | None] = []
    examples, shard_ids, rows = [], [], []
    for i, s in enumerate(self.shards):
      mm = self._open_shard(s, verify)
      self._maps.append(mm)
      if mm is None:
        ex = np.zeros(0, np.int64)
      elif s.get("first_example") is not None:
        ex = s["first_example"] + np.arange(s["num_records"], dtype=np.int64)
      else:
        o, _ = self.spec.layout["example_idx"]
        ex = np.ascontiguousarray(mm[:, o:o + 8]).view("<i8").reshape(-1).astype(np.int64)
      examples.append(ex)
      shard_ids.append(np.full(len(ex), i, np.int32))
      rows.append(np.arange(len(ex), dtype=np.int64))
    ex = np.concatenate(examples) if examples else np.zeros(0, np.int64)
    order = np.argsort(ex, kind="stable")
    self.example_indices = ex[order]  # sorted
    if len(ex) and (dup := self.example_indices[1:] == self.example_indices[:-1]).any():
      raise UserError(f"store {self.store_dir}: example index "
                      f"{self.example_indices[1:][dup][0]} is stored twice")
    self._shard_of = np.concatenate(shard_ids)[order] if shard_ids else np.zeros(0, np.int32)
    self._row_of = np.concatenate(rows)[order] if rows else np.zeros(0, np.int64)

  def _open_shard(self, s: dict, verify: bool) -> np.memmap | None:
    path = os.path.join(self.store_dir, s["file"])
    expected = s["num_records"] * self.spec.record_bytes
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size != expected:
      raise UserError(f"store shard {s['file']}: "
                      f"{'missing' if size is None else f'{size} bytes'}, expected {expected} "
                      "(truncated or partially written); re-run extract")
    if verify and sha256_file(path) != s["sha256"]:
      raise UserError(f"store shard {s['file']}: sha256 mismatch (corrupted or partially "
                      "written); re-run extract")
    if s["num_records"] == 0:
      return None
    return np.memmap(path, np.uint8, "r", shape=(s["num_records"], self.spec.record_bytes))

  @property
  def num_examples(self) -> int:
    return len(self.example_indices)

  @property
  def calibration(self) -> dict | None:
    return self.manifest.get("calibration")

  def read(self, example_indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Records of the given examples, in the given order.

    Returns {example_idx_N int64, token_hash_N uint64, ids_NxLxK int32, logprobs_NxLxK float32,
    tail_logmass_NxL float32, mask_NxL bool}, dense over L: the stored values at the mask's
    positions; elsewhere id 0, log-prob TAIL_FLOOR and tail 0.0. Compare token_hash_N with
    token_hash(batch token ids) to check the batch is the data the store was built from.
    """
    want_N = np.asarray(example_indices, np.int64).reshape(-1)
    pos = np.searchsorted(self.example_indices, want_N)
    pos_ok = np.minimum(pos, max(self.num_examples - 1, 0))
    found = (pos < self.num_examples) & (self.example_indices[pos_ok] == want_N)
    if not found.all():
      raise UserError(f"store {self.store_dir}: example index {want_N[~found][0]} not in store")
    shard_N, row_N = self._shard_of[pos], self._row_of[pos]
    rec_NxR = np.empty((len(want_N), self.spec.record_bytes), np.uint8)
    for sh in np.unique(shard_N):  # one fancy-indexed read per shard touched
      sel = np.nonzero(shard_N == sh)[0]
      rec_NxR[sel] = self._maps[sh][row_N[sel]]
    return _decode(self.spec, rec_NxR)
