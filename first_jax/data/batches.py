"""Examples -> prompt/response text -> tokenized, fixed-shape NumPy batches.

Shape letters: N examples, L sequence length, C choices, B batch (docs/design.md).

Owns everything after the examples are loaded (the example types and loaders live in
`first_jax.data.sources`): `format_mc` / `format_text` build prompt and response text;
`encode_mc` / `encode_text` give padded arrays (prompt and response are tokenized separately
and concatenated, so the answer letter is always its own token); `split_examples` makes
disjoint, recorded splits; `fingerprint` hashes examples + encoding settings; `BatchIterator`
yields resumable batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from first_jax.runtime.errors import UserError
from first_jax.runtime.io_util import atomic_write_json
from first_jax.data.sources import Example, LETTERS, MCExample, TextExample

log = logging.getLogger(__name__)

DEFAULT_MC_TEMPLATE = "{input}\n{options}\nAnswer:"
DEFAULT_TEXT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
LOSS_ON = ("response", "all")

# ------------------------------------------------------------------------------- formatting


def _tok_name(tok: Any) -> str:
  return getattr(tok, "name_or_path", "") or type(tok).__name__


def _chat(prompt: str, tok: Any, use_chat_template: bool) -> str:
  if not use_chat_template:
    return prompt
  if tok is None or not getattr(tok, "chat_template", None):
    raise UserError(f"data.use_chat_template: tokenizer {_tok_name(tok)} has no chat_template")
  return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                 add_generation_prompt=True)


def format_mc(ex: MCExample, template: str = DEFAULT_MC_TEMPLATE, letters: str = LETTERS,
              answer_prefix: str = " ", tok: Any = None,
              use_chat_template: bool = False) -> tuple[str, str]:
  """-> (prompt, response): "{input}\\nA) ..\\nB) ..\\nAnswer:" and " B" (prefix + letter)."""
  if len(ex.choices) > len(letters):
    raise UserError(f"data.letters: {len(letters)} letters for an example with "
                    f"{len(ex.choices)} choices")
  if not 0 <= ex.label < len(ex.choices):
    raise UserError(f"data: label {ex.label} out of range for {len(ex.choices)} choices")
  options = "\n".join(f"{l}) {c}" for l, c in zip(letters, ex.choices))
  try:
    prompt = template.format(input=ex.input, options=options)
  except (KeyError, IndexError, ValueError) as e:
    raise UserError(f"data.template: expected {{input}} and {{options}} fields ({e})") from None
  return _chat(prompt, tok, use_chat_template), answer_prefix + letters[ex.label]


def format_text(ex: TextExample, template: str = DEFAULT_TEXT_TEMPLATE, tok: Any = None,
                use_chat_template: bool = False) -> tuple[str, str]:
  """-> (prompt, response); an empty prompt stays empty (plain text, e.g. loss_on="all")."""
  if not ex.prompt:
    return "", ex.response
  try:
    prompt = template.format(prompt=ex.prompt)
  except (KeyError, IndexError, ValueError) as e:
    raise UserError(f"data.template: expected only a {{prompt}} field ({e})") from None
  return _chat(prompt, tok, use_chat_template), ex.response


def mc_as_text(ex: MCExample, answer_template: str = "{answer}") -> TextExample:
  """A choice example phrased as text: its input, answered by the gold choice's text through
  `answer_template` (e.g. "Sentiment: {answer}"), so text and choice runs of a task compare."""
  return TextExample(ex.input, answer_template.format(answer=ex.choices[ex.label]))


def choice_rows(examples: Sequence[MCExample],
                answer_template: str = "{answer}") -> tuple[list[TextExample], np.ndarray]:
  """One text row per (example, choice) for log-likelihood scoring -> (rows, group_R) where
  group_R[r] is the example of row r (rows of an example are consecutive, in choice order)."""
  rows, group = [], []
  for i, ex in enumerate(examples):
    for c in ex.choices:
      rows.append(TextExample(ex.input, answer_template.format(answer=c)))
      group.append(i)
  return rows, np.asarray(group, np.int64)


def choice_token_ids(tok: Any, num_choices: int, letters: str = LETTERS,
                     answer_prefix: str = " ") -> np.ndarray:
  """Token ids of the answers answer_prefix + letter, int32[C]; each must be exactly one token."""
  if num_choices > len(letters):
    raise UserError(f"data.letters: {len(letters)} letters for {num_choices} choices")
  ids = []
  for letter in letters[:num_choices]:
    t = tok(answer_prefix + letter, add_special_tokens=False)["input_ids"]
    if len(t) != 1:
      raise UserError(f"tokenizer {_tok_name(tok)}: answer {answer_prefix + letter!r} is {len(t)} "
                      "tokens, expected exactly 1 (change data.letters or data.answer_prefix)")
    ids.append(t[0])
  if len(set(ids)) != len(ids):
    raise UserError(f"tokenizer {_tok_name(tok)}: letters {letters[:num_choices]!r} share ids")
  return np.asarray(ids, np.int32)

# ------------------------------------------------------------------------------- tokenizing


def bucket_len(length: int, buckets: Sequence[int] | None = None) -> int:
  """Smallest bucket >= length; `buckets=None` means the powers of two from 64 up."""
  if buckets is None:
    return max(64, 1 << max(0, length - 1).bit_length())
  fits = [b for b in buckets if b >= length]
  if not fits:
    raise UserError(f"data.buckets: no bucket holds {length} tokens (largest is {max(buckets)})")
  return min(fits)


def _padded_len(longest: int, max_len: int, buckets: Sequence[int] | None) -> int:
  """One padded length per dataset (one compile): a bucket, capped at max_len; () -> max_len."""
  if buckets is not None and not buckets:
    return max_len
  cands = None if buckets is None else [b for b in buckets if b < max_len] + [max_len]
  return min(bucket_len(longest, cands), max_len)


def _pad_id(tok: Any) -> int:
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  if pad is None:
    raise UserError(f"tokenizer {_tok_name(tok)}: needs a pad or eos token")
  return int(pad)


def _pack(seqs: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int,
          loss_on: str) -> dict[str, np.ndarray]:
  """(prompt ids, response ids) pairs -> right-padded input_ids/attention_mask/targets/loss_mask."""
  n = len(seqs)
  ids_NxL = np.full((n, length), pad_id, np.int32)
  mask_NxL = np.zeros((n, length), np.int32)
  resp_NxL = np.zeros((n, length), bool)
  for i, (p, r) in enumerate(seqs):
    ids_NxL[i, :len(p) + len(r)] = p + r
    mask_NxL[i, :len(p) + len(r)] = 1
    resp_NxL[i, len(p):len(p) + len(r)] = True
  targets_NxL = np.full_like(ids_NxL, pad_id)
  targets_NxL[:, :-1] = ids_NxL[:, 1:]
  scored_NxL = resp_NxL if loss_on == "response" else mask_NxL.astype(bool)
  loss_mask_NxL = np.zeros((n, length), np.float32)
  loss_mask_NxL[:, :-1] = scored_NxL[:, 1:]  # Position t is scored when token t+1 is.
  return {"input_ids": ids_NxL, "attention_mask": mask_NxL, "targets": targets_NxL,
          "loss_mask": loss_mask_NxL, "example_id": np.arange(n, dtype=np.int64)}


def _check(examples: Sequence[Any], kind: type, loss_on: str, max_len: int) -> None:
  if not examples or not all(isinstance(e, kind) for e in examples):
    raise UserError(f"data: expected a non-empty list of {kind.__name__}")
  if loss_on not in LOSS_ON:
    raise UserError(f"data.loss_on: expected one of {LOSS_ON}, got {loss_on!r}")
  if max_len < 2:
    raise UserError(f"data.max_len: expected >= 2, got {max_len}")


def encode_mc(examples: Sequence[MCExample], tok: Any, max_len: int, loss_on: str = "response",
              letters: str = LETTERS, *, template: str = DEFAULT_MC_TEMPLATE,
              answer_prefix: str = " ", use_chat_template: bool = False,
              num_choices: int | None = None,
              buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """MCExamples -> input_ids/attention_mask/targets [N, L] int32, loss_mask [N, L] float32,
  answer_pos [N] int32, choice_ids [N, C] int32 (-1 padded), label [N] int32, example_id [N] int64,
  and human [N, C] float32 (raters' share per choice, NaN without raters) where examples have it.

  Sequence = prompt + one answer-letter token, no eos. Too long: the prompt is cut from the LEFT
  (the options and "Answer:" survive), counted and logged; if the prompt built with an empty input
  (options, template, chat wrapper) plus the answer does not fit, UserError. L = the smallest
  bucket holding the longest row, capped at max_len (`buckets=()`: always max_len). C =
  `num_choices` or the most choices of any example.
  """
  _check(examples, MCExample, loss_on, max_len)
  most = max(len(e.choices) for e in examples)
  n_c = num_choices or most
  if most > n_c:
    raise UserError(f"choices: {n_c} answer slots for an example with {most} choices")
  letter_ids = choice_token_ids(tok, n_c, letters, answer_prefix)
  fmt = dict(template=template, letters=letters, answer_prefix=answer_prefix, tok=tok,
             use_chat_template=use_chat_template)
  prompts = [format_mc(e, **fmt)[0] for e in examples]
  budget, seqs, truncated = max_len - 1, [], 0
  for i, (e, p) in enumerate(zip(examples, tok(prompts, add_special_tokens=False)["input_ids"])):
    if len(p) > budget:
      tail = tok(format_mc(dataclasses.replace(e, input=""), **fmt)[0],
                 add_special_tokens=False)["input_ids"]
      if len(tail) > budget:
        raise UserError(f"data.max_len: {max_len} tokens cannot hold the options and answer of "
                        f"example {i} ({len(tail) + 1} tokens)")
      p, truncated = p[-budget:], truncated + 1
    if not p:
      raise UserError(f"data.template: example {i} has an empty prompt")
    seqs.append((list(p), [int(letter_ids[e.label])]))
  if truncated:
    log.warning("%d of %d examples: prompt cut from the left to fit max_len=%d",
                truncated, len(examples), max_len)
  length = _padded_len(max(len(p) + 1 for p, _ in seqs), max_len, buckets)
  out = _pack(seqs, length, _pad_id(tok), loss_on)
  choice_NxC = np.full((len(examples), n_c), -1, np.int32)
  for i, e in enumerate(examples):
    choice_NxC[i, :len(e.choices)] = letter_ids[:len(e.choices)]
  out["answer_pos"] = np.asarray([len(p) - 1 for p, _ in seqs], np.int32)
  out["choice_ids"] = choice_NxC
  out["label"] = np.asarray([e.label for e in examples], np.int32)
  if any(e.human is not None for e in examples):  # raters' shares per choice; NaN: no raters
    out["human"] = np.full((len(examples), n_c), np.nan, np.float32)
    for i, e in enumerate(examples):
      if e.human is not None:
        out["human"][i, :len(e.human)] = e.human
  return out


def encode_text(examples: Sequence[TextExample], tok: Any, max_len: int,
                loss_on: str = "response", *, template: str = DEFAULT_TEXT_TEMPLATE,
                use_chat_template: bool = False, add_eos: bool = True,
                buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """TextExamples -> input_ids/attention_mask/targets [N, L] int32, loss_mask [N, L] float32,
  example_id [N] int64. Sequence = prompt + response + eos; "response" scores response + eos.

  Too long: the prompt is cut from the left down to max(max_len - response, max_len // 2)
  tokens, then the response (with its eos) is cut from the right; counted and logged.
  """
  _check(examples, TextExample, loss_on, max_len)
  eos = [tok.eos_token_id] if add_eos else []
  if add_eos and tok.eos_token_id is None:
    raise UserError(f"tokenizer {_tok_name(tok)}: add_eos needs an eos token")
  pairs = [format_text(e, template, tok, use_chat_template) for e in examples]
  p_ids = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
  r_ids = tok([r for _, r in pairs], add_special_tokens=False)["input_ids"]
  seqs, truncated = [], 0
  for i, (p, r) in enumerate(zip(p_ids, r_ids)):
    p, r = list(p), list(r) + eos
    if not r:
      raise UserError(f"data: example {i}: field response: expected text, got an empty response")
    if len(p) + len(r) > max_len:
      keep = max(max_len - len(r), min(len(p), max_len // 2))
      p = p[len(p) - keep:]
      r, truncated = r[:max_len - len(p)], truncated + 1
    seqs.append((p, r))
  if truncated:
    log.warning("%d of %d examples truncated to max_len=%d", truncated, len(examples), max_len)
  length = _padded_len(max(len(p) + len(r) for p, r in seqs), max_len, buckets)
  return _pack(seqs, length, _pad_id(tok), loss_on)

# ---------------------------------------------------------------------------- splits, hashes


def example_sha256(examples: Sequence[Example]) -> str:
  """sha256 over the canonical JSON of each example, in order."""
  h = hashlib.sha256()
  for ex in examples:
    fields = dataclasses.asdict(ex)
    if fields.get("human", ()) is None:  # (examples without raters hash as before the field)
      del fields["human"]
    h.update(json.dumps([type(ex).__name__, fields], sort_keys=True,
                        ensure_ascii=False).encode() + b"\n")
  return h.hexdigest()


def _question(ex: Example) -> str:
  """What the model is asked: for MC the input AND its options (one text, other options, is a
  different question)."""
  if isinstance(ex, MCExample):
    return ex.input + "\x00" + "\x00".join(ex.choices)
  return ex.prompt or ex.response


def split_examples(examples: Sequence[Example], sizes: Mapping[str, float | int],
                   seed: int) -> tuple[dict[str, list[Example]], dict[str, Any]]:
  """Deterministic disjoint splits; -> ({name: examples}, record for `save_split_record`).

  `sizes`: all ints (counts) or fractions (sum <= 1; if they sum to 1 the last split takes the
  rounding remainder). Examples with identical question text form one group, so a question never
  lands in two splits; groups are dealt, in a rng(seed) permutation, to the splits in the order
  given until each split holds at least its size. Indices in each split are sorted.
  """
  n, vals = len(examples), list(sizes.values())
  if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in vals):
    raise UserError(f"data.splits: expected non-negative counts or fractions, got {dict(sizes)}")
  if any(isinstance(v, float) for v in vals):
    if sum(vals) > 1 + 1e-9:
      raise UserError(f"data.splits: fractions sum to {sum(vals)} > 1")
    counts = [int(math.floor(v * n + 1e-9)) for v in vals]
    if counts and abs(sum(vals) - 1) < 1e-9:
      counts[-1] = n - sum(counts[:-1])
  else:
    counts = [int(v) for v in vals]
  if sum(counts) > n:
    raise UserError(f"data.splits: {sum(counts)} examples asked for, only {n} available")
  groups: dict[str, list[int]] = {}
  for i, ex in enumerate(examples):
    groups.setdefault(_question(ex), []).append(i)
  group_list = list(groups.values())
  order = np.random.default_rng(seed).permutation(len(group_list))
  pos, indices = 0, {}
  for name, count in zip(sizes, counts):
    picked: list[int] = []
    while len(picked) < count and pos < len(order):
      picked += group_list[order[pos]]
      pos += 1
    indices[name] = sorted(picked)
  if len(group_list) < n:
    log.info("split: %d repeated questions kept together", n - len(group_list))
  splits = {k: [examples[i] for i in idx] for k, idx in indices.items()}
  record = {"seed": seed, "sizes": dict(sizes), "num_examples": n,
            "examples_sha256": example_sha256(examples),
            "splits": {k: {"indices": idx, "sha256": example_sha256(splits[k])}
                       for k, idx in indices.items()}}
  return splits, record


def save_split_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Writes the record, unless the file already holds it (a re-run leaves it untouched)."""
  try:
    with open(path, encoding="utf-8") as f:
      if json.load(f) == json.loads(json.dumps(dict(record))):
        return
  except (OSError, ValueError):
    pass
  atomic_write_json(path, dict(record))


def fingerprint(examples: Sequence[Example], tokenizer_hash: str, max_len: int,
                **settings: Any) -> str:
  """sha256 hex of the examples, tokenizer, max_len and any JSON-able encoding settings."""
  payload = {"examples": example_sha256(examples), "num_examples": len(examples),
             "tokenizer": tokenizer_hash, "max_len": max_len, "settings": settings}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

# ---------------------------------------------------------------------------------- batching


def num_steps(n: int, batch_size: int, epochs: int, drop_remainder: bool = True) -> int:
  per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
  return per_epoch * epochs


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, lengths_N: np.ndarray | None,
                length_buckets: Sequence[int]) -> np.ndarray:
  """Epoch `epoch`'s shuffled row order of n rows; batch i is rows [i * B, (i + 1) * B).

  rng([seed, epoch]).permutation(n). With length buckets, rows are dealt in that order into the
  smallest bucket holding them; each bucket is cut into batches (its leftover rows join the
  next, longer bucket) and the batches are shuffled, so a batch's rows have similar lengths and
  `trim_batch` can cut its padding. The same rows are visited each epoch; only the last < B rows
  are left out.
  """
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(n)
  if not length_buckets:
    return perm
  which = np.minimum(np.searchsorted(length_buckets, lengths_N[perm], side="left"),
                     len(length_buckets) - 1)
  batches, carry = [], np.zeros(0, perm.dtype)
  for i in range(len(length_buckets)):
    rows = np.concatenate([carry, perm[which == i]])
    full = len(rows) // batch_size * batch_size
    batches += list(rows[:full].reshape(-1, batch_size))
    carry = rows[full:]
  order = [batches[j] for j in rng.permutation(len(batches))] + [carry]
  return np.concatenate(order)


class BatchIterator:
  """Deterministic, resumable batches: epoch e visits rows in rng([seed, e]).permutation(N).

  Each batch is {key: array[B, ...]} plus `valid` [B] float32 (0 marks padding rows). With
  drop_remainder=False the last batch of an epoch is padded with copies of its first row.
  `state()` is the position of the next batch; `restore(state)` continues from it exactly.

  Multi-host: `host_rows` (`sharding.process_rows`) picks this process's rows of each global
  batch, and only those are gathered, so a host reads only its share (every host's iterator
  takes the same global batches in lockstep; the position is global). `trim=True` cuts the
  padding columns to the smallest of `length_buckets` that holds the longest row of the GLOBAL
  batch (`trim_batch`), so every host's slice has the same width. `add_fields` adds entries to
  the host's gathered rows before the trim (the teacher's stored top-k: `train.store_targets`).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
               shuffle: bool = True, drop_remainder: bool = True, num_epochs: int | None = None,
               length_buckets: Sequence[int] = (), host_rows: slice = slice(None),
               trim: bool = False, add_fields: Callable[[dict], dict] | None = None):
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or "valid" in arrays:
      raise UserError("data: arrays must share their leading size and not contain 'valid'")
    self._arrays, self._n = dict(arrays), sizes.pop()
    if batch_size < 1 or self._n < 1 or (drop_remainder and self._n < batch_size):
      raise UserError(f"data.batch_size: {batch_size} does not fit {self._n} examples "
                      f"(drop_remainder={drop_remainder})")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.num_epochs = num_epochs
    self.batches_per_epoch = num_steps(self._n, batch_size, 1, drop_remainder)
    self.length_buckets = tuple(sorted(length_buckets))
    if self.length_buckets and not (shuffle and drop_remainder):
      raise UserError("data.length_buckets: only for shuffled training batches")
    self._lengths = (np.asarray(arrays["attention_mask"]).sum(-1) if self.length_buckets
                     else None)
    self.host_rows, self.trim, self.add_fields = host_rows, trim, add_fields
    self._epoch, self._index, self._order = 0, 0, None

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, int]) -> None:
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
      raise UserError(f"data state: {dict(state)} is not a position of this iterator")
    self._epoch, self._index, self._order = epoch, index, None
    if index == self.batches_per_epoch:
      self._epoch, self._index = epoch + 1, 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    if self._order is None:
      self._order = (epoch_order(self._n, self.batch_size, self.seed, self._epoch,
                                 self._lengths, self.length_buckets)
                     if self.shuffle else np.arange(self._n))
    b = self.batch_size
    rows = self._order[self._index * b:(self._index + 1) * b]
    valid_B = np.zeros(b, np.float32)
    valid_B[:len(rows)] = 1.0
    rows = np.concatenate([rows, np.full(b - len(rows), rows[0], rows.dtype)])
    self._index += 1
    if self._index == self.batches_per_epoch:
      self._epoch, self._index, self._order = self._epoch + 1, 0, None
    mine = rows[self.host_rows]
    batch = {k: a[mine] for k, a in self._arrays.items()}
    batch["valid"] = valid_B[self.host_rows]
    if self.add_fields is not None:
      batch = self.add_fields(batch)
    if self.trim:
      batch = trim_batch(batch, self.length_buckets,
                         longest=int(self._lengths[rows].max()) if self.length_buckets else None)
    return batch


def trim_batch(batch: Mapping[str, np.ndarray], length_buckets: Sequence[int],
               longest: int | None = None) -> dict:
  """Cuts the padding columns of a right-padded batch down to the smallest bucket that holds
  its longest row (every [B, L, ...] entry); exact for a causal model. () -> unchanged.
  `longest`: the longest row of the global batch this one is a host's part of (default: this
  batch's)."""
  length = batch["input_ids"].shape[1]
  if not length_buckets:
    return dict(batch)
  if longest is None:
    longest = int(np.asarray(batch["attention_mask"]).sum(-1).max())
  keep = min([b for b in length_buckets if b >= longest] + [length])
  return {k: (v[:, :keep] if np.ndim(v) >= 2 and v.shape[1] == length else v)
          for k, v in batch.items()}
