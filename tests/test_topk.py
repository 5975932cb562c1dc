"""first_jax.core.topk against float64 NumPy, and vocab-parallel == plain on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from first_jax.runtime.errors import UserError
from first_jax.core import topk

_extract = jax.jit(topk.extract, static_argnums=1)


def _logits(rng, shape, dtype, ties=True):
  x_xV = (rng.normal(size=shape) * 3.0).astype(np.float32)
  if ties:  # equal values straddling the k-th place: tie-breaking must pick lower ids
    x_xV.reshape(-1, shape[-1])[0, 3:shape[-1]:2] = x_xV.max() + 1.0
  return np.asarray(jnp.asarray(x_xV, dtype).astype(jnp.float32)), jnp.asarray(x_xV, dtype)


def _reference(x_xV, k):
  """float64: stable descending order (lower id first on ties), log-probs, direct tail sum."""
  x = x_xV.astype(np.float64)
  m = x.max(-1, keepdims=True)
  lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
  ids = np.argsort(-x, axis=-1, kind="stable")[..., :k]
  lp = np.take_along_axis(x, ids, -1) - lse[..., None]
  in_topk = np.zeros(x.shape, bool)
  np.put_along_axis(in_topk, ids, True, -1)
  with np.errstate(divide="ignore"):
    tail = np.log(np.where(in_topk, 0.0, np.exp(x - lse[..., None])).sum(-1))
  return lp, ids, tail


@pytest.mark.parametrize("shape", [(7, 50), (2, 3, 1000)])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extract_matches_numpy(shape, k, dtype):
  rng = np.random.default_rng(hash((shape, k, str(dtype))) % 2**32)
  x_np, x = _logits(rng, shape, dtype)
  lp, ids, tail = _extract(x, k)
  ref_lp, ref_ids, ref_tail = _reference(x_np, k)
  assert lp.dtype == jnp.float32 and ids.dtype == jnp.int32 and tail.shape == shape[:-1]
  np.testing.assert_array_equal(np.asarray(ids), ref_ids)
  np.testing.assert_allclose(np.asarray(lp), ref_lp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(tail), ref_tail, rtol=1e-5, atol=1e-5)


def test_tail_is_accurate_when_small_and_floored_when_empty():
  x = np.full((2, 1000), -20.0, np.float32)
  x[:, 0] = 0.0
  x[:, 1:5] = -9.0
  lp, _, tail = _extract(jnp.asarray(x), 5)
  ref_lp, _, ref_tail = _reference(x, 5)
  # tail ~ 2e-6 of the mass: log1mexp(logsumexp(top-k log-probs)) in float32 is 40% off here.
  assert np.exp(ref_tail[0]) < 1e-5
  np.testing.assert_allclose(np.asarray(tail), ref_tail, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(lp), ref_lp, rtol=1e-6, atol=2e-6)
  # k == V: nothing is left, the tail is the finite floor (never -inf / NaN).
  _, _, tail_all = _extract(jnp.asarray(x[:, :7]), 7)
  np.testing.assert_array_equal(np.asarray(tail_all), topk.TAIL_FLOOR)
  # fewer finite logits than k: the -inf entries carry no mass.
  x_inf = np.full((1, 10), -np.inf, np.float32)
  x_inf[0, :3] = [1.0, 2.0, 3.0]
  lp_inf, ids_inf, tail_inf = _extract(jnp.asarray(x_inf), 5)
  assert float(tail_inf[0]) == topk.TAIL_FLOOR
  np.testing.assert_array_equal(np.asarray(ids_inf[0, :3]), [2, 1, 0])
  np.testing.assert_allclose(np.exp(np.asarray(lp_inf[0, :3])).sum(), 1.0, rtol=1e-6)


def test_log1mexp_is_stable():
  x = np.array([-1e-9, -1e-3, -0.5, -0.7, -5.0, -50.0], np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(topk.log1mexp)(jnp.asarray(x))),
                             np.log(-np.expm1(x.astype(np.float64))), rtol=1e-5, atol=1e-12)
  out = np.asarray(topk.log1mexp(jnp.asarray([0.0, 1e-3], jnp.float32)))
  assert np.all(np.isfinite(out)) and np.all(out <= -80.0)
  g = jax.jit(jax.grad(topk.log1mexp))(jnp.float32(0.0))
  assert np.isfinite(float(g))


def test_extract_rejects_bad_k():
  with pytest.raises(UserError, match="k:"):
    topk.extract(jnp.ones((2, 4)), 5)


def _check_parallel(mesh, lead, dtype, k=5):
  rng = np.random.default_rng(7)
  _, x = _logits(rng, (4, 3, 128), dtype)
  ref = _extract(x, k)
  spec = P(*lead, "vocab")
  x_sharded = jax.device_put(x, NamedSharding(mesh, spec))
  f = jax.jit(lambda a: topk.extract_vocab_parallel(a, k, mesh, "vocab", lead))
  got = f(x_sharded)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(ref[2]), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vocab_parallel_8_devices(dtype):
  mesh = Mesh(np.array(jax.devices()[:8]), ("vocab",))
  _check_parallel(mesh, (None, None), dtype)


@pytest.mark.parametrize("explicit", [False, True])
def test_vocab_parallel_2x4_mesh(explicit):
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  if explicit:  # jax.make_mesh's default axis types may be Explicit
    mesh = jax.make_mesh((2, 4), ("data", "vocab"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  else:
    mesh = Mesh(devices, ("data", "vocab"))
  _check_parallel(mesh, ("data", None), jnp.float32)


def test_vocab_parallel_rejects_indivisible_vocab():
  mesh = Mesh(np.array(jax.devices()[:8]), ("vocab",))
  with pytest.raises(UserError, match="mesh.vocab"):
    topk.extract_vocab_parallel(jnp.ones((2, 100)), 5, mesh)


def test_vocab_parallel_with_an_all_masked_shard():
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(3, 128)) - 200.0).astype(np.float32)
  x[:, :16] = -np.inf  # shard 0 of 8 holds no mass; the rest is far below 0
  mesh = Mesh(np.array(jax.devices()[:8]), ("vocab",))
  got = jax.jit(lambda a: topk.extract_vocab_parallel(a, 5, mesh))(
      jax.device_put(x, NamedSharding(mesh, P(None, "vocab"))))
  ref_lp, ref_ids, ref_tail = _reference(x, 5)
  np.testing.assert_array_equal(np.asarray(got[1]), ref_ids)
  np.testing.assert_allclose(np.asarray(got[0]), ref_lp, rtol=1e-5, atol=2e-6)
  # |logits| ~ 200: float32 spacing there is 1.5e-5, which bounds v - lse in the tail
  np.testing.assert_allclose(np.asarray(got[2]), ref_tail, rtol=1e-5, atol=3e-5)
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(_extract(jnp.asarray(x), 5)[2]),
                             atol=3e-5)


def test_extract_compiles_without_vocab_sized_temporaries():
  # float32 logits: the top-k and the one capped-sum pass read them in place (no [x, V]
  # temporary, e.g. no exp(l - m) materialised for a second sum). (bfloat16 logits are
  # converted to float32 first on XLA:CPU, which materialises that conversion.)
  x = jax.ShapeDtypeStruct((4, 64, 8192), jnp.float32)
  mem = jax.jit(topk.extract, static_argnums=1).lower(x, 5).compile().memory_analysis()
  assert mem.temp_size_in_bytes < 4 * 64 * 8192 * 4 / 16, mem.temp_size_in_bytes
