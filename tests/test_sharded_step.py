"""One optimizer step on 8 fake devices, meshes (data=2, fsdp=2, tensor=2) and (data=8), equals
the single-device step: fine-tuning, offline top-k KD and online KD with the in-step search."""
import jax
import numpy as np
import pytest

from first_jax.runtime import sharding as sh
from first_jax.core import step
from first_jax.models import apply_fn, Decoder, init_params, ModelConfig
from first_jax.engine import trainer

TEACHER = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2)
STUDENT = TEACHER.replace(hidden_size=32, intermediate_size=64, num_layers=1)
B, L, K = 8, 12, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, L), np.int32)
  mask[np.arange(B) % 3 == 1, 9:] = 0
  loss = (rng.random((B, L)) < 0.6).astype(np.float32) * mask
  lp = np.sort(rng.normal(-2, 1.5, (B, L, K)), -1)[..., ::-1]
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True) / 0.9)  # 90% of the mass inside the top-k
  return {"input_ids": rng.integers(0, 256, (B, L)).astype(np.int32), "attention_mask": mask,
          "targets": rng.integers(0, 256, (B, L)).astype(np.int32), "loss_mask": loss,
          "valid": np.ones(B, np.float32),
          "teacher_ids": np.stack([rng.permutation(256)[:K] for _ in range(B * L)]).reshape(
              B, L, K).astype(np.int32),
          "teacher_logprobs": lp.astype(np.float32),
          "teacher_tail": np.full((B, L), np.log(0.1), np.float32)}


SPECS = {
    "finetune": step.LossSpec(kind="ce", label_smoothing=0.1),
    "offline_kd": step.LossSpec(kind="topk_kd", k=K, temperature_mode="prob_softmax"),
    "online_kd_search": step.LossSpec(kind="topk_kd", k=K, temperature_mode="log_space",
                                      online=True, search=True, search_events=64,
                                      search_min_events=8),
}


def _one_step(spec, mesh):
  student = init_params(STUDENT, jax.random.key(1))
  teacher = init_params(TEACHER, jax.random.key(2)) if spec.online else None
  place = lambda p, cfg: jax.device_put(p, sh.param_shardings(
      jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), np.zeros((1, 1), np.int32))[
          "params"]), mesh))
  student = place(student, STUDENT)
  teacher = place(teacher, TEACHER) if teacher is not None else None
  tx = step.make_optimizer(lr=1e-3, total_steps=10, warmup_ratio=0.0, weight_decay=0.01,
                           clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-6)
  events = step.event_buffer(spec.search_events, K) if spec.search else None
  batch = _batch()
  if spec.online:
    batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
  state, fn = trainer.compile_step(Decoder(STUDENT), student, spec, tx, mesh,
                                   sh.batch_sharding(mesh),
                                   teacher_module=Decoder(TEACHER) if teacher else None,
                                   teacher_params=teacher, events=events,
                                   initial_temperature=1.5)
  batch = jax.device_put(batch, sh.batch_sharding(mesh))
  hlo = fn.lower(state, batch, teacher).as_text()
  state, metrics = fn(state, batch, teacher)
  return state, metrics, hlo


# By default the online program (which holds the other two's parts) on the 3-axis mesh; the
# other programs and pure data parallelism under -m slow (the suite's 10-minute budget).
CASES = [("online_kd_search", (2, 2, 2))] + [
    pytest.param(k, shape, marks=pytest.mark.slow)
    for k, shape in [(k, (2, 2, 2)) for k in ("finetune", "offline_kd")]
    + [(k, (8, 1, 1)) for k in sorted(SPECS)]]


@pytest.mark.parametrize("kind, shape", CASES)
def test_one_step_sharded_equals_one_device(kind, shape):
  spec = SPECS[kind]
  ref_state, ref_metrics, _ = _one_step(spec, sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  mesh = sh.make_mesh(*shape)
  state, metrics, hlo = _one_step(spec, mesh)
  # the online teacher's top-k is vocab-parallel (per-shard top-k and merge, in a shard_map)
  # exactly when the tensor axis splits the vocabulary
  assert ("manual_computation" in hlo) == (spec.online and mesh.shape["tensor"] > 1), kind
  emb = state.params["embed"]
  assert len(emb.sharding.device_set) == 8  # the state is laid out over the whole mesh
  if shape == (2, 2, 2):
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if "embed" in jax.tree_util.keystr(path)]  # AdamW's mu and nu of the embedding
    assert len(moments) == 2 and all(m.sharding.spec == emb.sharding.spec for m in moments)
  loss, ref_loss = (float(m["loss"][0] / m["loss"][1]) for m in (metrics, ref_metrics))
  assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (shape, loss, ref_loss)
  assert float(metrics["temperature"][0]) == pytest.approx(float(ref_metrics["temperature"][0]),
                                                           abs=1e-5)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       ref_state.params, init_params(STUDENT, jax.random.key(1)))
  assert max(jax.tree.leaves(moved)) > 1e-4  # the step did change the params (lr 1e-3)
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                      state.params, ref_state.params)
  assert max(jax.tree.leaves(diff)) <= 1e-5, (shape, diff)
  if spec.search:  # the in-step search moved the temperature away from its start
    assert float(ref_state.temperature) != pytest.approx(1.5)


def test_extraction_on_a_vocab_split_mesh_is_vocab_parallel_and_equals_one_device():
  """With tensor=2 the extraction program takes the top-k per vocabulary shard and merges the
  candidates (no [B, L, V] gather): ids identical to one device, log-probs and tail equal."""
  from first_jax.engine import infer
  batch = {k: v for k, v in _batch().items() if k in ("input_ids", "attention_mask")}
  params = init_params(TEACHER, jax.random.key(2))
  one = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  mesh = sh.make_mesh(2, 2, 2)
  placed = jax.device_put(params, sh.param_shardings(
      jax.eval_shape(lambda: Decoder(TEACHER).init(jax.random.key(0), np.zeros((1, 1), np.int32))[
          "params"]), mesh))
  hlo = infer.topk_program(Decoder(TEACHER), placed, K, False, mesh).lower(
      placed, jax.device_put(batch, sh.batch_sharding(mesh))).as_text()
  assert "manual_computation" in hlo  # the per-shard top-k and merge (shard_map)
  ref = jax.jit(lambda p, b: infer.teacher_topk(p, b, apply=apply_fn(Decoder(TEACHER)), k=K))(
      params, batch)  # one device, the plain top-k
  got = infer.topk_program(Decoder(TEACHER), placed, K, False, mesh)(
      placed, jax.device_put(batch, sh.batch_sharding(mesh)))
  np.testing.assert_array_equal(np.asarray(got["teacher_ids"]), np.asarray(ref["teacher_ids"]))
  for key in ("teacher_logprobs", "teacher_tail"):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(ref[key]), atol=1e-5, rtol=1e-5)
