"""Decoder parity with transformers (Llama / Qwen2 / Mistral), HF I/O round trips, helpers."""
import copy
import json
import os
import random
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import first_jax.models
from first_jax.runtime.errors import UserError
from first_jax.models import (Decoder, hf_to_params, init_params, layer_subset, load_pretrained,
                              ModelConfig, params_to_hf, save_pretrained, trim_vocab)

V = 300
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
ARCHS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                   {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig,
                {"sliding_window": 6}),
    "llama3_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                    {"tie_word_embeddings": True, "rope_scaling": LLAMA3,
                     "rope_theta": 500000.0}),
}


def _hf_model(arch, seed=0, layers=2):
  cls, cfg_cls, extra = ARCHS[arch]
  torch.manual_seed(seed)
  cfg = cfg_cls(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                **copy.deepcopy(extra))  # transformers mutates rope dicts.
  model = cls(cfg).eval()
  # transformers' N(0, 0.02) init gives near-zero logits; use unit-scale activations instead so
  # a 1e-4 tolerance means something.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif "bias" in name:
        p.copy_(0.1 * torch.randn_like(p))
      elif "embed" in name:
        p.copy_(torch.randn_like(p) * (0.3 if cfg.tie_word_embeddings else 1.0))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
  return model


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (3, 16))
  mask = np.ones((3, 16), np.int64)
  mask[1, 11:] = 0  # Right padding.
  mask[2, 4:] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """arch -> (dir, torch reference logits) saved once per module."""
  out = {}
  ids, mask = _inputs()
  for arch in ARCHS:
    model = _hf_model(arch)
    d = tmp_path_factory.mktemp(arch)
    model.save_pretrained(d)
    out[arch] = (str(d), _torch_logits(model, ids, mask))
  return out


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_load_pretrained_matches_transformers(hf_dirs, arch, scan):
  d, ref = hf_dirs[arch]
  ids, mask = _inputs()
  model = load_pretrained(d, scan_layers=scan)
  logits = np.asarray(model(ids, mask))
  assert logits.dtype == np.float32 and np.isfinite(logits).all()  # Padded rows too.
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(logits[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
  assert model.config.tie_word_embeddings == ("tied" in arch)
  assert ("lm_head" in model.params) != model.config.tie_word_embeddings
  if scan:
    assert model.params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_loads_in_transformers(hf_dirs, arch, tmp_path):
  d, ref = hf_dirs[arch]
  ids, mask = _inputs()
  save_pretrained(load_pretrained(d, scan_layers=arch != "llama"), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
      ARCHS[arch][0].__name__]
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(_torch_logits(again, ids, mask)[mask == 1], ref[mask == 1],
                             atol=1e-4, rtol=0)


def test_llama3_rope_scaling_changes_logits(hf_dirs):
  d, ref = hf_dirs["llama3_tied"]
  ids, mask = _inputs()
  model = load_pretrained(d)
  plain = first_jax.models.Model(model.config.replace(rope_scaling=None), model.params)
  assert np.abs(np.asarray(plain(ids, mask)) - ref)[mask == 1].max() > 1e-2


def test_sharded_safetensors_index(tmp_path):
  model = _hf_model("llama", seed=1)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert not (tmp_path / "model.safetensors").exists()
  ids, mask = _inputs(1)
  ours = np.asarray(load_pretrained(tmp_path)(ids, mask))
  np.testing.assert_allclose(ours[mask == 1], _torch_logits(model, ids, mask)[mask == 1],
                             atol=1e-4, rtol=0)


def test_gguf_path_uses_reader_iterator(monkeypatch, tmp_path):
  """A .gguf path goes through gguf_io.read_gguf's (config, iterator) in any tensor order."""
  model = _hf_model("qwen2_tied", seed=2)
  items = [(k, v.numpy()) for k, v in model.state_dict().items()]  # Includes tied lm_head.
  random.Random(0).shuffle(items)
  fake = types.SimpleNamespace(read_gguf=lambda path: (model.config.to_dict(), iter(items)))
  monkeypatch.setitem(sys.modules, "first_jax.models.gguf_io", fake)
  monkeypatch.setattr(first_jax.models, "gguf_io", fake, raising=False)
  (tmp_path / "m.gguf").write_bytes(b"")
  ids, mask = _inputs(2)
  ours = np.asarray(load_pretrained(tmp_path / "m.gguf")(ids, mask))
  np.testing.assert_allclose(ours[mask == 1], _torch_logits(model, ids, mask)[mask == 1],
                             atol=1e-4, rtol=0)


def test_layer_subset_equals_transformers_with_those_layers():
  teacher = _hf_model("llama", seed=3, layers=3)
  cfg = ModelConfig.from_hf(teacher.config.to_dict())
  state = {k: v.numpy() for k, v in teacher.state_dict().items()}
  student_hf = _hf_model("llama", seed=4, layers=2)
  renamed = {k.replace("layers.2.", "layers.1."): torch.tensor(v) for k, v in state.items()
             if ".layers.1." not in k}
  student_hf.load_state_dict(renamed)
  ids, mask = _inputs(3)
  ref = _torch_logits(student_hf, ids, mask)
  for scan in (True, False):
    c = cfg.replace(scan_layers=scan)
    sub_cfg, sub_params = layer_subset(c, hf_to_params(c, state.items()), [0, 2])
    assert sub_cfg.num_layers == 2
    out = np.asarray(_fwd(sub_cfg, sub_params, ids, mask))
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
  with pytest.raises(UserError, match="layers"):
    layer_subset(cfg, hf_to_params(cfg, state.items()), [0, 3])


def _fwd(cfg, params, ids, mask=None, method=None):
  return jax.jit(lambda p, i, m: Decoder(cfg).apply({"params": p}, i, m, method=method))(
      params, ids, mask)


def _tiny(**kw):
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2)
  return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
  """One random untied tiny model shared by the tests below (init compiles are slow)."""
  cfg = _tiny()
  return cfg, init_params(cfg, jax.random.key(0))


def test_left_padding_and_empty_rows(tiny):
  cfg, params = tiny
  ids = np.random.default_rng(5).integers(0, V, (1, 10))
  plain = _fwd(cfg, params, ids, np.ones((1, 10)))
  left_ids = np.concatenate([np.array([[-100, V, V + 7]]), ids], axis=1)  # Odd pad ids.
  left_mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 10))], axis=1)
  left = _fwd(cfg, params, left_ids, left_mask)
  np.testing.assert_allclose(left[:, 3:], plain, atol=1e-5)
  empty = _fwd(cfg, params, ids, np.zeros((1, 10)))
  assert np.isfinite(np.asarray(empty)).all()


def test_remat_and_bf16_match_f32(tiny):
  cfg, params = tiny
  ids = jax.random.randint(jax.random.key(2), (2, 8), 0, V)
  loss = lambda c: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(Decoder(c).apply({"params": p}, ids) ** 2)))(params)
  (l0, g0), (l1, g1) = loss(cfg), loss(cfg.replace(remat=True))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)
  ref = _fwd(cfg, params, ids)
  bf_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf = _fwd(bf_cfg, bf_params, ids)
  assert bf.dtype == jnp.float32
  assert 0 < float(jnp.abs(bf - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_logits_from_hidden_matches_call(tiny):
  cfg = tiny[0].replace(tie_word_embeddings=True)
  params = {k: v for k, v in tiny[1].items() if k != "lm_head"}
  ids = jax.random.randint(jax.random.key(4), (2, 6), 0, V)
  h = _fwd(cfg, params, ids, method=Decoder.hidden)
  assert h.shape == (2, 6, 32)
  head_fn = lambda p, x: Decoder(cfg).apply({"params": p}, x, method=Decoder.logits_from_hidden)
  head = jax.jit(head_fn)(params, h[:, -1])
  assert head.shape == (2, V) and head.dtype == jnp.float32
  np.testing.assert_allclose(head, _fwd(cfg, params, ids)[:, -1], atol=1e-5)


def test_trim_vocab(tiny):
  cfg, params = tiny
  ids = jax.random.randint(jax.random.key(6), (2, 6), 0, 250)
  small_cfg, small = trim_vocab(cfg, params, 250)
  assert small_cfg.vocab_size == 250 and small["embed"].shape == (250, 32)
  np.testing.assert_allclose(_fwd(small_cfg, small, ids), _fwd(cfg, params, ids)[..., :250],
                             atol=1e-5)
  with pytest.raises(UserError, match="larger than the model"):
    trim_vocab(cfg, params, V + 1)


def test_config_validation_names_field():
  with pytest.raises(UserError, match=r"model\.num_kv_heads: must divide num_heads \(9\), got 4"):
    _tiny(hidden_size=36, num_heads=9, num_kv_heads=4)
  with pytest.raises(UserError, match=r"model\.dtype"):
    _tiny(dtype="float16")
  with pytest.raises(UserError, match=r"student\.num_layerz: unknown field"):
    ModelConfig.from_dict(dict(_tiny().to_dict(), num_layerz=1), prefix="student")
  with pytest.raises(UserError, match=r"student\.num_kv_heads"):
    ModelConfig.from_dict(dict(_tiny().to_dict(), num_kv_heads=3), prefix="student")
  cfg = _tiny(rope_scaling=LLAMA3, rope_theta=5e5, tie_word_embeddings=True)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  # transformers 5 keeps rope_theta inside rope_parameters only.
  v5 = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                rope_theta=1234.0).to_dict()
  assert "rope_theta" not in v5 and ModelConfig.from_hf(v5).rope_theta == 1234.0


def test_bad_checkpoints_raise_user_error(tiny, tmp_path):
  cfg, params = tiny
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg.to_hf(), model_type="gpt2")))
  with pytest.raises(UserError, match="model_type"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg.to_hf(), num_key_value_heads=3)))
  with pytest.raises(UserError, match="config.json: model.num_kv_heads"):
    load_pretrained(tmp_path)
  tensors = params_to_hf(cfg, params)
  name = "model.layers.1.mlp.up_proj.weight"
  with pytest.raises(UserError, match=f"missing tensor {name}"):
    hf_to_params(cfg, [(k, v) for k, v in tensors.items() if k != name])
  with pytest.raises(UserError, match=f"{name} has shape"):
    hf_to_params(cfg, dict(tensors, **{name: tensors[name][:, :-1]}).items())
  with pytest.raises(UserError, match="unexpected tensor"):
    extra = {"model.layers.0.self_attn.o_proj.bias": np.ones(32, np.float32)}
    hf_to_params(cfg, dict(tensors, **extra).items())
  with pytest.raises(UserError, match="expected a Hugging Face model directory"):
    load_pretrained(os.path.join(tmp_path, "nope"))
