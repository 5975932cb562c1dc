"""Mesh, logical rules -> shardings, sharded init / load on 8 fake CPU devices == one device."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from first_jax.runtime import sharding as sh
from first_jax.runtime.errors import UserError
from first_jax.models import (abstract_params, Decoder, init_params, load_pretrained, ModelConfig,
                              save_pretrained)

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sh.make_mesh(data=2, fsdp=2, tensor=2)


def test_make_mesh_checks_device_count(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(UserError, match=r"mesh: data\*fsdp\*tensor must equal the 8 devices"):
    sh.make_mesh(3, 1, 1)
  with pytest.raises(UserError, match=r"mesh\.tensor"):
    sh.make_mesh(8, 1, 0)
  assert sh.make_mesh(1, 1, 2, devices=jax.devices()[:2]).size == 2


def test_param_shardings_follow_rules(mesh):
  s = sh.param_shardings(abstract_params(CFG), mesh)
  assert s["embed"].spec == P("tensor", "fsdp")
  assert s["lm_head"].spec == P("fsdp", "tensor")
  assert s["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert s["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
  assert s["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert s["final_norm"]["scale"].spec == P(None)
  assert sh.batch_sharding(mesh).spec == P(("data", "fsdp"))
  with pytest.raises(UserError, match="no rule for logical axis 'heads'"):
    sh.param_shardings(abstract_params(CFG), mesh, [r for r in sh.DEFAULT_RULES if r[0] != "heads"])


def test_indivisible_dimension_replicated_with_warning_or_error(mesh, caplog):
  smol_like = CFG.replace(hidden_size=72, num_heads=9, num_kv_heads=3)  # head_dim 8.
  with caplog.at_level(logging.WARNING, logger="first_jax.runtime.sharding"):
    s = sh.param_shardings(abstract_params(smol_like), mesh)
  # Only the heads dimension falls back; embed keeps its fsdp sharding.
  assert s["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", None, None)
  assert "layers/attn/q_proj/kernel: dimension 2 (heads, size 9)" in caplog.text
  with pytest.raises(UserError, match=r"layers/attn/k_proj/kernel: .*kv_heads, size 3"):
    sh.param_shardings(abstract_params(smol_like), mesh, on_indivisible="error")


def test_sharded_init_and_forward_match_one_device(mesh):
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 12))
  mask = np.ones((4, 12), np.int32)
  mask[1, 7:] = 0
  params = sh.init_sharded(Decoder(CFG), mesh, sh.DEFAULT_RULES, jax.random.key(0),
                           [jax.ShapeDtypeStruct((1, 1), jnp.int32)])
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  assert len(params["embed"].addressable_shards) == 8
  assert params["embed"].addressable_shards[0].data.shape == (128, 32)
  single = init_params(CFG, jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, single)
  fwd = jax.jit(Decoder(CFG).apply)
  sharded = fwd({"params": params}, jax.device_put(ids, sh.batch_sharding(mesh)),
                jax.device_put(mask, sh.batch_sharding(mesh)))
  ref = fwd({"params": single}, ids, mask)
  assert float(jnp.abs(ref).max()) > 1.0
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref), atol=1e-5, rtol=0)


def test_load_pretrained_places_params_on_mesh(mesh, tmp_path):
  cfg = CFG.replace(model_type="qwen2", tie_word_embeddings=True)
  save_pretrained((cfg, init_params(cfg, jax.random.key(1))), tmp_path)
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10))
  plain = load_pretrained(tmp_path)
  placed = load_pretrained(tmp_path, mesh=mesh)
  q_bias = placed.params["layers"]["attn"]["q_proj"]["bias"]
  assert q_bias.sharding.spec == P(None, "tensor", None)
  assert placed.params["embed"].sharding.spec == P("tensor", "fsdp")
  np.testing.assert_allclose(np.asarray(placed(ids)), np.asarray(plain(ids)), atol=1e-5, rtol=0)


def test_opt_state_shardings_mirror_params(mesh):
  params = sh.init_sharded(Decoder(CFG), mesh, sh.DEFAULT_RULES, jax.random.key(2),
                           [jnp.zeros((1, 1), jnp.int32)])
  shardings = jax.tree.map(lambda x: x.sharding, params)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state_shardings = sh.opt_state_shardings(tx, params, shardings, mesh)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  adam = state[1][0]
  assert adam.mu["embed"].sharding.spec == P("tensor", "fsdp")
  assert adam.nu["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert adam.count.sharding.spec == P()
