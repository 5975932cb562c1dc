"""Tokenizers as `transformers.PreTrainedTokenizerFast`, from a HF dir, a tokenizer.json, a GGUF or "gpt2".

Only `tok(text, add_special_tokens=False)["input_ids"]` and `tok.decode` are relied on elsewhere.
A GGUF's embedded byte-level BPE vocabulary is rebuilt with `tokenizers`: vocab + merges, the
pre-tokenizer named by `tokenizer.ggml.pre`, control tokens (type 3) registered as special tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from first_jax.runtime.errors import UserError

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user-defined (added, matched whole).
_CONTROL, _USER_DEFINED = 3, 4
# GPT-2's split regex, used by llama.cpp for "gpt2"-style pre-tokenizers.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama-3's split regex (llama.cpp pre "llama-bpe"/"llama3"): digits in groups of up to three.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _fast(tokenizer_object, **kwargs):
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **kwargs)


def _pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers as pt

  byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":  # llama.cpp: "\p{N}" split first, then GPT-2's regex
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
  if pre in ("gpt2", "default", "gpt-2"):
    return byte_level
  if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
    return pt.Sequence([
      pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
      pt.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  raise UserError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                  "(expected smollm, gpt2, default or llama-bpe)")


def _from_gguf(path: Path):
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors

  from first_jax.models.gguf_io import gguf_tokenizer_data

  data = gguf_tokenizer_data(path)
  if data["model"] != "gpt2":
    raise UserError(f"{path}: tokenizer.ggml.model {data['model']!r} is not supported "
                    "(only byte-level BPE, 'gpt2')")
  tokens = data["tokens"]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise UserError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
  merges = [tuple(m.split(" ", 1)) for m in data["merges"]]
  unk = data["unknown_token_id"]
  bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None if unk is None else tokens[unk],
                   fuse_unk=False, byte_fallback=False)
  tok = Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(data["pre"], str(path))
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  types = data["token_types"]
  special = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty == _CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(user)

  def name(key: str) -> str | None:
    i = data[f"{key}_token_id"]
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  kwargs = {"bos_token": name("bos"), "eos_token": name("eos"), "unk_token": name("unknown"),
            "pad_token": name("padding") or name("eos")}
  fast = _fast(tok, **{k: v for k, v in kwargs.items() if v is not None})
  if data["chat_template"]:
    fast.chat_template = data["chat_template"]
  return fast


def _gpt2(cache_dir: str | os.PathLike | None = None):
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  from first_jax.data import assets

  encoder = assets.fetch("gpt2_tokenizer", cache_dir)
  tok = Tokenizer(models.BPE.from_file(str(encoder), str(encoder.parent / "vocab.bpe")))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  eot = "<|endoftext|>"
  tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
  return _fast(tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def load(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
  """A `PreTrainedTokenizerFast` from a HF dir, a tokenizer.json, a `.gguf`, or the name "gpt2"."""
  if str(path_or_name) == "gpt2" and not os.path.exists("gpt2"):
    return _gpt2(cache_dir)
  path = Path(path_or_name)
  if path.is_dir():
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
      from transformers import AutoTokenizer

      try:
        return AutoTokenizer.from_pretrained(str(path))
      except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load the HF tokenizer ({e})") from None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return _from_gguf(ggufs[0])
    raise UserError(f"{path}: expected tokenizer.json, tokenizer_config.json or one .gguf file")
  if path.suffix == ".gguf":
    if not path.is_file():
      raise UserError(f"{path}: GGUF file not found")
    return _from_gguf(path)
  if path.suffix == ".json":
    if not path.is_file():
      raise UserError(f"{path}: tokenizer.json not found")
    from tokenizers import Tokenizer

    try:
      return _fast(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise UserError(f"{path}: not a tokenizers JSON file ({e})") from None
  raise UserError(f"tokenizer: {path_or_name!r} is neither a HF tokenizer dir, a tokenizer.json, "
                  "a .gguf file nor 'gpt2'")


def _canonical(tok) -> dict[str, Any]:
  return json.loads(tok.backend_tokenizer.to_str())


def tokenizer_hash(tok) -> str:
  """sha256 of the canonical (sorted-key) tokenizers JSON: equal hashes give equal token ids.

  It covers vocabulary, merges, added/special tokens, normalizer and pre-tokenizer; it ignores
  the chat template and the bos/eos/pad names kept by the transformers wrapper.
  """
  blob = json.dumps(_canonical(tok), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def vocab_size(tok) -> int:
  """Number of token ids the tokenizer can emit, added tokens included (`len(tok)`).

  A model's vocabulary may be larger (embedding rows padded to a multiple of 64/128); a model
  vocabulary smaller than this is an error for the caller to raise.
  """
  return len(tok)
