"""Mixed precision (issue 23): bfloat16 compute with float32 accumulation, float32 master
weights and optimizer state, per-dtype XLA options; bf16 against f32 and against PyTorch's
autocast on random tiny models."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from first_jax.runtime import xla_options
from first_jax.core import step
from first_jax.models import (apply_fn, Decoder, init_params, load_pretrained, Model, ModelConfig,
                              precision)
from first_jax.engine import trainer

V = 256


def _cfg(**kw):
  base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2)
  return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
  cfg = _cfg()
  return cfg, init_params(cfg, jax.random.key(3))


def _ids(seed, b=4, l=16):
  return np.random.default_rng(seed).integers(0, V, (b, l)).astype(np.int32)


def test_every_bf16_matmul_accumulates_in_float32(model):
  cfg, params = model
  bf = cfg.replace(dtype="bfloat16")
  text = jax.jit(lambda p, i: Decoder(bf).apply({"params": p}, i)).lower(
      params, _ids(0)).as_text()
  dots = [l for l in text.splitlines() if "dot_general" in l]
  bf16_in = [l for l in dots if re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\)", l)]
  assert len(bf16_in) >= 8  # q, k, v, o, gate, up, down, scores, weighted sum, head ...
  assert all(re.search(r"-> tensor<[^>]*xf32>", l) for l in bf16_in), \
      [l for l in bf16_in if not re.search(r"-> tensor<[^>]*xf32>", l)][:2]
  f32_text = jax.jit(lambda p, i: Decoder(cfg).apply({"params": p}, i)).lower(
      params, _ids(0)).as_text()
  assert "bf16" not in f32_text  # float32 runs stay float32


def test_bf16_forward_and_gradients_within_tolerance_of_f32(model):
  cfg, params = model
  ids, targets = _ids(1), _ids(2)

  def loss(c):
    def f(p):
      lp = jax.nn.log_softmax(Decoder(c).apply({"params": p}, ids), -1)
      return -jnp.take_along_axis(lp, targets[..., None], -1).mean()
    return jax.jit(jax.value_and_grad(f))(params)

  (l32, g32), (l16, g16) = loss(cfg), loss(cfg.replace(dtype="bfloat16"))
  assert abs(float(l16) - float(l32)) < 0.01 * abs(float(l32))
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32  # gradients of the float32 master weights
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
    assert cos > 0.99, cos
  f32 = np.asarray(jax.jit(lambda p: Decoder(cfg).apply({"params": p}, ids))(params))
  b16 = np.asarray(jax.jit(lambda p: Decoder(cfg.replace(dtype="bfloat16")).apply(
      {"params": p}, ids))(params))
  assert b16.dtype == np.float32
  assert 0 < np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max()
  top5 = lambda x: np.argsort(-x, -1)[..., :5]  # noqa: E731
  assert np.mean(top5(b16)[..., 0] == top5(f32)[..., 0]) > 0.9


def test_bf16_parity_with_transformers_autocast(tmp_path):
  """first_jax at bf16 compute is as close to the float32 reference as transformers under
  torch.autocast(bfloat16) is."""
  torch.manual_seed(4)
  hcfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64)
  hf = transformers.LlamaForCausalLM(hcfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
              else torch.randn_like(p) / (p.shape[1] ** 0.5 if "embed" not in name else 1.0))
  hf.save_pretrained(tmp_path)
  ids = _ids(5, 3, 12)
  with torch.no_grad():
    ref = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
      auto = hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
  ours = np.asarray(load_pretrained(str(tmp_path), dtype="bfloat16")(ids))
  f32 = np.asarray(load_pretrained(str(tmp_path))(ids))
  np.testing.assert_allclose(f32, ref, atol=1e-4, rtol=0)
  err_auto, err_ours = np.abs(auto - ref).max(), np.abs(ours - ref).max()
  assert 0 < err_ours <= 2 * err_auto, (err_ours, err_auto)
  assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= np.mean(auto.argmax(-1) ==
                                                                ref.argmax(-1)) - 0.1


def test_optimizer_state_is_float32_whatever_the_param_dtype():
  rng = np.random.default_rng(6)
  p32 = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  g32 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p32)
  kw = dict(lr=1e-2, total_steps=10, warmup_ratio=0.0, weight_decay=0.1, clip_norm=1.0, b1=0.9,
            b2=0.999, eps=1e-8)
  tx = step.make_optimizer(**kw)
  # float32 params: the wrapper changes nothing, bit for bit
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  wrapped = step.float32_moments(plain)
  v, _ = plain.update(g32, plain.init(p32), p32)
  w, _ = wrapped.update(g32, wrapped.init(p32), p32)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), w, v)
  u, _ = tx.update(g32, tx.init(p32), p32)  # make_optimizer's, for the bf16 comparison below
  # bfloat16 params: float32 moments, bfloat16 updates close to the float32 ones
  p16, g16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in (p32, g32))
  state = tx.init(p16)
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)
            and x.ndim > 0]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  u16, state = tx.update(g16, state, p16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-4,
                                                       rtol=2e-2), u16, u)


def test_xla_options_per_platform_and_dtype(model):
  assert xla_options.fused_dots("cpu") == xla_options.FUSED_DOTS_CPU
  assert xla_options.fused_dots("cpu", "float32") == xla_options.FUSED_DOTS_CPU
  assert xla_options.fused_dots("cpu", "bfloat16") is None
  assert xla_options.fused_dots("gpu", "float32") is None
  cfg, _ = model
  f32, bf = Decoder(cfg), Decoder(cfg.replace(dtype="bfloat16"))
  assert trainer._compute_dtype(f32) == "float32"
  assert trainer._compute_dtype(f32, bf) == "bfloat16"
  assert trainer._compute_dtype(f32, None) == "float32"


@pytest.mark.parametrize("spec,shapes", [
    ("abc,ce->abe", ((2, 5, 16), (16, 24))),  # Linear
    ("abce,cef->abf", ((2, 5, 4, 8), (4, 8, 12))),  # o_proj: two contracted axes
    ("abd,vd->abv", ((2, 5, 16), (40, 16))),  # tied output head
    ("blgre,bmge->bgrlm", ((2, 6, 2, 3, 8), (2, 6, 2, 8))),  # attention scores
    ("bgrlm,bmge->blgre", ((2, 2, 3, 6, 6), (2, 6, 2, 8))),  # attention-weighted values
])
def test_mixed_einsum_and_its_gradient_against_float64(spec, shapes):
  """The forward against NumPy in float64; the written-out gradient against JAX's own autodiff
  of the plain einsum (float32, on the same operand values), so the transpose rule is checked,
  not restated."""
  rng = np.random.default_rng(7)
  a64, b64 = (rng.normal(size=s) for s in shapes)
  g64 = rng.normal(size=np.einsum(spec, a64, b64).shape)
  # a float32 operand and a bf16 one: each gradient comes back in its input's dtype
  a, b = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.bfloat16)
  b_used = np.asarray(b, np.float64)  # the bf16 operand's own value is the references'
  _, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, jnp.asarray(b, jnp.float32))
  ref_da, ref_db = (np.asarray(x, np.float64) for x in ref_vjp(jnp.asarray(g64, jnp.float32)))
  assert np.abs(ref_da).max() > 0 and np.abs(ref_db).max() > 0
  for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
    f = lambda a, b: precision.einsum(spec, a, b, dtype)  # noqa: E731
    y, vjp = jax.vjp(f, a, b)
    da, db = vjp(jnp.asarray(g64, jnp.float32))
    assert y.dtype == jnp.float32 and da.dtype == jnp.float32 and db.dtype == jnp.bfloat16
    for got, want, t in ((y, np.einsum(spec, a64, b_used), tol), (da, ref_da, tol),
                         (db, ref_db, 2e-2)):  # db is bf16, b's dtype, at either precision
      err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
      assert err < t, (dtype, err)


def test_mixed_einsum_rejects_what_its_gradient_rule_cannot_do():
  x = jnp.ones((2, 3))
  for spec in ("ab,bc", "ab,cd->ad", "...a,ab->...b", "aab,bc->ac"):
    with pytest.raises(ValueError, match="einsum spec"):
      precision.einsum(spec, x, x, "bfloat16")


def test_bf16_training_program_has_no_float32_matmul(model):
  """Forward and backward: every dot of the bf16 program takes two bf16 operands and returns
  float32 (JAX's own transpose would contract the float32 cotangent with a bf16 operand, a mixed
  dot XLA:CPU runs at float32 speed)."""
  cfg, params = model
  ids, targets = _ids(1), _ids(2)
  bf = Decoder(cfg.replace(dtype="bfloat16"))

  def loss(p):
    lp = jax.nn.log_softmax(bf.apply({"params": p}, ids), -1)
    return -jnp.take_along_axis(lp, targets[..., None], -1).mean()
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  dots = [l for l in text.splitlines() if "dot_general" in l]
  assert len(dots) >= 24  # forward + two per matmul backward
  bad = [l for l in dots if not re.search(
      r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*xf32>", l)]
  assert not bad, bad[:2]


def test_for_inference_keeps_kernels_in_the_compute_dtype_and_the_outputs(model):
  cfg, params = model
  ids = _ids(8)
  m = Model(cfg.replace(dtype="bfloat16"), params)
  fast = m.for_inference()
  kinds = {jax.tree_util.keystr(k): v.dtype for k, v in
           jax.tree_util.tree_flatten_with_path(fast.params)[0]}
  lowp = lambda k: "kernel" in k or "lm_head" in k  # noqa: E731
  assert all(d == jnp.bfloat16 for k, d in kinds.items() if lowp(k))
  assert all(d == jnp.float32 for k, d in kinds.items() if not lowp(k))  # norms, embedding
  np.testing.assert_array_equal(np.asarray(fast(ids)), np.asarray(m(ids)))
  f32 = Model(cfg, params)
  assert f32.for_inference() is f32


def _train_program(dtype, steps=3):
  from tests.test_step import make_batch, run_steps, tiny
  m = tiny(0, layers=2)
  m = Model(m.config.replace(dtype=dtype), m.params)
  state, losses = run_steps(m, step.LossSpec(kind="ce"), make_batch(1), steps, lr=1e-3)
  return m, state, losses


def test_bf16_train_steps_follow_the_f32_ones():
  """Three AdamW steps from the same weights: the bf16 program's loss curve and parameter
  update within a stated tolerance of the f32 program's."""
  m, s32, l32 = _train_program("float32")
  _, s16, l16 = _train_program("bfloat16")
  np.testing.assert_allclose(l16, l32, rtol=0.02)
  d32 = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b
                        in zip(jax.tree.leaves(s32.params), jax.tree.leaves(m.params))])
  d16 = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b
                        in zip(jax.tree.leaves(s16.params), jax.tree.leaves(m.params))])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))  # f32 master weights
  cos = d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32))
  assert cos > 0.95, cos
  assert 0.8 < np.linalg.norm(d16) / np.linalg.norm(d32) < 1.25


def test_bf16_train_step_temporaries_stay_near_the_f32_steps():
  """The policy keeps activations float32 between matmuls (for accuracy, and because XLA:CPU
  computes bf16 elementwise ops in float32 anyway), so bf16 saves no activation memory: the
  bf16 copies of the matmul operands kept for the backward add a few percent (measured +4% at
  B=4, L=256; a [B, L, V] f32 copy of the logits or of the activations would be far more)."""
  from tests.test_step import tiny
  base = tiny(0, layers=2, hidden=64)
  tx = step.make_optimizer(lr=1e-3, total_steps=1, warmup_ratio=0.0, weight_decay=0.0,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  ids = np.random.default_rng(9).integers(0, base.config.vocab_size, (4, 256)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": ids,
           "loss_mask": np.ones(ids.shape, np.float32)}
  mem = {}
  for dt in ("float32", "bfloat16"):
    m = Model(base.config.replace(dtype=dt), base.params)
    fn = jax.jit(lambda s, b, m=m: step.train_step(
        s, b, None, student_apply=apply_fn(m.module), teacher_apply=None,
        spec=step.LossSpec(kind="ce"), tx=tx))
    mem[dt] = fn.lower(step.init_state(m.params, tx), batch).compile(
        ).memory_analysis().temp_size_in_bytes
  assert 0 < mem["bfloat16"] <= 1.1 * mem["float32"], mem
