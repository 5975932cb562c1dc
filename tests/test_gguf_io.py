"""GGUF -> transformers names/layout/config; llama.cpp's Q/K permutation undone; real SmolLM2 (slow)."""
import time

import gguf
import numpy as np
import pytest

from first_jax.runtime.errors import UserError
from first_jax.models import gguf_io

# Names as llama.cpp's convert_hf_to_gguf writes them, spelled out independently of gguf_io.
_TO_GGUF = {
  "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
}
_CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
            max_position_embeddings=256)


def _gguf_name(hf: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf in top:
    return top[hf]
  _, _, n, *module, leaf = hf.split(".")
  return f"blk.{n}.{_TO_GGUF['.'.join(module)]}.{leaf}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _random_state(tied: bool, rng) -> dict[str, np.ndarray]:
  c = _CFG
  d, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
  if not tied:
    shapes["lm_head.weight"] = (c["vocab_size"], d)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
      p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, d),
      p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, d),
      p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, d),
      p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * hd),
      p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
      p + "mlp.down_proj.weight": (d, f),
      p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
    })
  return {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}


def _write_gguf(path, state, cfg, q8_embed=False):
  """Writes `state` the way llama.cpp's converter does (names, permuted Q/K, metadata)."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, x in state.items():
    if ".q_proj." in name:
      x = _llamacpp_permute(x, cfg["num_attention_heads"])
    elif ".k_proj." in name:
      x = _llamacpp_permute(x, cfg["num_key_value_heads"])
    if q8_embed and name == "model.embed_tokens.weight":
      q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(_gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(_gguf_name(name), x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_recovers_hf_tensors_and_config(tmp_path, tied):
  rng = np.random.default_rng()
  state = _random_state(tied, rng)
  _write_gguf(tmp_path / "m.gguf", state, _CFG)
  cfg, tensors = gguf_io.read_gguf(tmp_path / "m.gguf")
  got = dict(tensors)
  assert set(got) == set(state)
  for name, x in state.items():
    assert got[name].dtype == np.float32 and got[name].shape == x.shape, name
    np.testing.assert_array_equal(got[name], x, err_msg=name)
  for key, value in _CFG.items():
    assert cfg[key] == pytest.approx(value), key
  assert cfg["tie_word_embeddings"] is tied
  assert cfg["head_dim"] == 8 and cfg["model_type"] == "llama"
  assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(_CFG["rope_theta"])
  assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_quantized_tensor_is_dequantized_in_hf_layout(tmp_path):
  state = _random_state(True, np.random.default_rng())
  _write_gguf(tmp_path / "m.gguf", state, _CFG, q8_embed=True)
  _, tensors = gguf_io.read_gguf(tmp_path / "m.gguf")
  emb = dict(tensors)["model.embed_tokens.weight"]
  ref = state["model.embed_tokens.weight"]
  assert emb.shape == ref.shape
  # Q8_0: one scale per 32 values, 8-bit codes -> error below max|x| / 127 per block.
  np.testing.assert_allclose(emb, ref, atol=np.abs(ref).max() / 100)
  assert not np.array_equal(emb, ref)  # it really went through the quantised path


def _rope(x_NxD: np.ndarray, pos_N: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
  """float64 RoPE; llama.cpp pairs (2i, 2i+1), transformers pairs (i, i + D/2)."""
  d = x_NxD.shape[-1]
  ang = pos_N[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
  cos, sin = np.cos(ang), np.sin(ang)
  a, b = (x_NxD[:, 0::2], x_NxD[:, 1::2]) if interleaved else (x_NxD[:, :d // 2], x_NxD[:, d // 2:])
  ra, rb = a * cos - b * sin, a * sin + b * cos
  if interleaved:
    return np.stack([ra, rb], -1).reshape(x_NxD.shape)
  return np.concatenate([ra, rb], -1)


def test_unpermute_turns_interleaved_rope_into_rotate_half():
  """Attention scores of the GGUF weights under llama.cpp's RoPE equal those of the recovered
  weights under transformers' RoPE: the un-permutation has the right direction."""
  rng = np.random.default_rng()
  n_head, hd, d, n = 3, 16, 24, 7
  wq_gguf = rng.normal(size=(n_head * hd, d))
  wk_gguf = rng.normal(size=(n_head * hd, d))
  x_NxD = rng.normal(size=(n, d))
  pos_N = rng.integers(0, 500, n).astype(np.float64)
  wq_hf, wk_hf = gguf_io.unpermute_qk(wq_gguf, n_head), gguf_io.unpermute_qk(wk_gguf, n_head)
  for h in range(n_head):
    rows = slice(h * hd, (h + 1) * hd)
    s_ref = (_rope(x_NxD @ wq_gguf[rows].T, pos_N, 1e4, True)
             @ _rope(x_NxD @ wk_gguf[rows].T, pos_N, 1e4, True).T)
    s_hf = (_rope(x_NxD @ wq_hf[rows].T, pos_N, 1e4, False)
            @ _rope(x_NxD @ wk_hf[rows].T, pos_N, 1e4, False).T)
    np.testing.assert_allclose(s_hf, s_ref, rtol=1e-10, atol=1e-10)
    s_bad = (_rope(x_NxD @ wq_gguf[rows].T, pos_N, 1e4, False)
             @ _rope(x_NxD @ wk_gguf[rows].T, pos_N, 1e4, False).T)
    assert not np.allclose(s_bad, s_ref, atol=1e-3)
  np.testing.assert_array_equal(_llamacpp_permute(wq_hf, n_head), wq_gguf)


def test_transformers_model_from_gguf_matches_original(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    **_CFG, tie_word_embeddings=False)).float().eval()
  state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  _write_gguf(tmp_path / "m.gguf", state, _CFG)
  cfg, tensors = gguf_io.read_gguf(tmp_path / "m.gguf")
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors}, strict=True)
  ids = torch.from_numpy(np.random.default_rng().integers(0, _CFG["vocab_size"], (2, 20)))
  with torch.no_grad():
    np.testing.assert_allclose(model(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)


def test_names_and_errors(tmp_path):
  assert gguf_io.hf_name("blk.11.ffn_down.weight") == "model.layers.11.mlp.down_proj.weight"
  assert gguf_io.hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
  assert gguf_io.hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
  assert gguf_io.hf_name("rope_freqs.weight") is None
  with pytest.raises(UserError, match="GGUF file not found"):
    gguf_io.read_gguf(tmp_path / "missing.gguf")
  (tmp_path / "junk.gguf").write_bytes(np.random.default_rng().bytes(64))
  with pytest.raises(UserError, match="not a readable GGUF"):
    gguf_io.read_gguf(tmp_path / "junk.gguf")
  w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(UserError, match="architecture 'gemma3' is not supported"):
    gguf_io.read_gguf(tmp_path / "g.gguf")


# ---- the real model (slow): SmolLM2-135M-Instruct Q4_1 from PyPI ------------------------------


def botchan_note() -> str:
  """The translator's note of Botchan (first two paragraphs, 353 SmolLM2 tokens)."""
  from first_jax.data import assets

  text = assets.fetch("botchan").read_text(encoding="utf-8").replace("\r\n", "\n")
  end = "lasting appeal to the reader."
  return text[text.index("No translation can expect"):text.index(end) + len(end)]


_GLUE_LEFT = {".", ",", ";", ":", "?", "!", ")", "''", "'"}  # attach to the previous word
_GLUE_RIGHT = {"``", "`", "("}  # attach to the next word


def brown_news_paragraph(doc: str = "ca01") -> str:
  """The opening of a Brown news text (the sentences before its first headline) as plain text.

  Brown files hold one sentence per line of "word/tag" tokens; headline lines carry "-hl" tags.
  Tags are dropped (split at the last "/"), `` and '' become ", punctuation is glued to its
  neighbour, the sentence-final "." Brown adds after an abbreviation ("Jr. .") is dropped, the
  token order is kept (Brown's ''. stays ".), and sentences are joined by single spaces.
  """
  from first_jax.data import assets

  raw = (assets.fetch("brown").parent / doc).read_text(encoding="utf-8")
  sentences = []
  for line in filter(str.strip, raw.splitlines()):
    pairs = [t.rsplit("/", 1) for t in line.split()]
    if all(tag.endswith("-hl") for _, tag in pairs):
      if sentences:
        break
      continue
    words = [w for w, _ in pairs]
    if len(words) > 1 and words[-1] == "." and words[-2].endswith("."):
      words.pop()
    sentences.append(words)
  out, glue = [], True
  for words in sentences:
    for w in words:
      if not glue and w not in _GLUE_LEFT:
        out.append(" ")
      out.append({"``": '"', "''": '"'}.get(w, w))
      glue = w in _GLUE_RIGHT
  return "".join(out)


@pytest.fixture(scope="module")
def smollm2():
  from first_jax.data import assets

  path = assets.fetch("smollm2")
  start = time.perf_counter()
  cfg, tensors = gguf_io.read_gguf(path)
  state = dict(tensors)
  print(f"read_gguf SmolLM2: {time.perf_counter() - start:.1f} s, {len(state)} tensors")
  return path, cfg, state


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2):
  """transformers' own GGUF conversion (independent names, permutation, layout) agrees exactly."""
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path, cfg, state = smollm2
  assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
  assert cfg["rope_theta"] == 1e5 and cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
  shell = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
  ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=shell)["tensors"]
  assert set(ref) == set(state)
  for name, x in ref.items():
    np.testing.assert_array_equal(state[name], np.asarray(x), err_msg=name)


@pytest.mark.slow
def test_smollm2_perplexity(smollm2):
  """Perplexity (exp of the mean NLL of tokens 2..n, no BOS) of our Flax decoder on real English.

  Brown ca01's opening (1961 news) and botchan's translator's note; figures in docs/models.md.
  The tokenizer must round-trip both texts exactly; transformers' decoder on the same weights is
  the logits reference, and with llama.cpp's Q/K permutation left in place it must be far worse.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from first_jax.data import tokenizer
  from first_jax.models import load_pretrained

  path, cfg, state = smollm2
  tok = tokenizer.load(path)
  flax_model = load_pretrained(path)

  def torch_model(weights):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    return model

  ref = torch_model(state)
  still_permuted = torch_model({k: (_llamacpp_permute(v, 9) if ".q_proj." in k else
                                    _llamacpp_permute(v, 3) if ".k_proj." in k else v)
                                for k, v in state.items()})

  def perplexity(logits_LxV, ids):
    z = np.asarray(logits_LxV[:-1], np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))

  # (text, SmolLM2 tokens, bound): measured 47.3 and 35.5; the issue's < 20 is not reached.
  texts = {"brown ca01": (brown_news_paragraph("ca01"), 260, 55.0),
           "botchan note": (botchan_note(), 353, 45.0)}
  for name, (text, n_tokens, bound) in texts.items():
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == n_tokens, name
    assert tok.decode(ids) == text, name  # exact round trip
    logits_LxV = np.asarray(flax_model(np.asarray([ids])))[0]
    with torch.no_grad():
      ref_LxV = ref(torch.tensor([ids])).logits[0].numpy()
      bad_LxV = still_permuted(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits_LxV, ref_LxV, atol=2e-3, rtol=2e-3, err_msg=name)
    ppl, ppl_ref, ppl_bad = (perplexity(x, ids) for x in (logits_LxV, ref_LxV, bad_LxV))
    print(f"SmolLM2 perplexity, {name}, {len(ids)} tokens: {ppl:.2f} (transformers "
          f"{ppl_ref:.2f}; Q/K left permuted: {ppl_bad:.1f})")
    assert ppl == pytest.approx(ppl_ref, rel=1e-3), name
    assert ppl < bound, name
    assert ppl_bad > 4 * ppl, name
