"""Pure train and eval steps: arrays in, arrays out; the driver jits them once.

    train_step(state, batch, teacher_params) -> (state, metrics)

One step function serves every training stage; `LossSpec` (static, hashable) picks the loss:
  ce       cross-entropy on the batch targets (+ label smoothing)         [fine-tuning, SFT]
  topk_kd  KL to the teacher's top-k, targets either in the batch (offline, from the store) or
           made here from the teacher's logits (online: teacher forward under stop_gradient,
           top-k, optional in-step ECE temperature search, rescale, KL: one XLA program)
  full_kd  full-vocabulary KL to an online teacher at temperature T        [reference baseline]
  sampled_kd  KL estimated from a priority sample of the teacher's full distribution at T
           (`first_jax.core.sampled`): unbiased where top-k is not; targets from a sampled
           store (offline) or drawn here from the teacher's logits (online, a fresh draw
           each step)
Metrics are (sum, count) pairs so that averages over steps and hosts are token-weighted.

Batch keys (first_jax.data.batches), with their shapes: input_ids [B, L], attention_mask [B, L],
targets [B, L], loss_mask [B, L]; response-only multiple choice also answer_pos [B] and
choice_ids [B, C]; offline KD teacher_ids [B, L, K], teacher_logprobs [B, L, K] and
teacher_tail [B, L] (from the store; a sampled store's teacher_tail is log tau, the
sample's threshold).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from first_jax.core import losses, sampled, temperature, topk

Apply = Callable[..., jax.Array]  # (params, input_ids_BxL, attention_mask_BxL) -> logits_BxLxV


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  temperature: jax.Array  # teacher temperature in use (the in-step search's when searching)
  events: Any = None  # online search: ring buffer of the latest teacher events (`event_buffer`)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static loss hyper-parameters (part of the compiled program)."""
  kind: str = "ce"  # ce | topk_kd | full_kd | sampled_kd
  label_smoothing: float = 0.0
  smooth_over: str = "vocab"  # vocab | choices (the answer letters of multiple choice)
  k: int = 5
  tail: str = "bucket"  # bucket | renormalize
  direction: str = "forward"  # forward | reverse | jsd
  temperature_mode: str | None = "prob_softmax"  # None: targets used as they are (plain KD)
  search: bool = False  # online only: ECE search over a buffer of the latest teacher events
  ema: float = 0.0  # smoothing of the searched temperature over steps (0: none)
  search_events: int = 1024  # buffer size (events kept from the latest steps)
  search_min_events: int = 256  # below this many events the start temperature is kept
  search_choices: bool = False  # events scored over the choice tokens (evaluate.scoring=choices)
  num_bins: int = 10
  online: bool = False
  # MCQA with a response-only loss: every row's loss sits at its answer position, so the output
  # head (V-wide) runs there only, not at all L positions. Same loss, ~L x cheaper head.
  answer_only: bool = False
  samples: int = 0  # sampled_kd: tokens kept per position (U)
  sample_seed: int = 0  # sampled_kd online: the draws' seed (with the step and the row)


def float32_moments(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on float32 views of the params and updates, so its state (AdamW's moments, the
  clipping norm) is float32 whatever the param dtype; each update is returned in its param's
  dtype. With float32 params every cast is the identity."""
  def f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init(params):
    return inner.init(f32(params))

  def update(updates, state, params=None):
    out, state = inner.update(f32(updates), state, None if params is None else f32(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

  return optax.GradientTransformation(init, update)


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float, weight_decay: float,
                   clip_norm: float, b1: float, b2: float, eps: float,
                   grad_accum: int = 1) -> optax.GradientTransformation:
  """AdamW, linear warmup + cosine decay, global-norm clipping, optional accumulation; updates
  with a non-finite gradient are skipped; moments in float32 (`float32_moments`)."""
  updates = max(1, total_steps // max(1, grad_accum))
  warmup = int(round(warmup_ratio * updates))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(updates, warmup + 1), end_value=0.0)
  tx = float32_moments(optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)))
  # A non-finite gradient skips the update (params and moments unchanged); the trainer counts
  # them and stops a run that keeps producing them, so optax never applies one.
  tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
  return optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx


def event_buffer(size: int, k: int, num_choices: int = 0) -> dict[str, jax.Array]:
  """An empty ring buffer of teacher events for the online search (weight 0 = empty slot)."""
  buf = {"logprobs": jnp.zeros((size, k), jnp.float32), "ids": jnp.zeros((size, k), jnp.int32),
         "tail": jnp.zeros((size,), jnp.float32), "target": jnp.zeros((size,), jnp.int32),
         "weight": jnp.zeros((size,), jnp.float32), "next": jnp.zeros((), jnp.int32)}
  if num_choices:
    buf["choice_ids"] = jnp.full((size, num_choices), -1, jnp.int32)
  return buf


def init_state(params: Any, tx: optax.GradientTransformation, initial_temperature: float = 1.0,
               events: Any = None) -> TrainState:
  """`events`: an `event_buffer` when the temperature is searched in the step."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    temperature=jnp.asarray(initial_temperature, jnp.float32), events=events)


def teacher_topk(teacher_logits_BxLxV: jax.Array, k: int, mesh=None) -> dict[str, jax.Array]:
  """The teacher's concentrated knowledge: top-k log-probs, ids and tail log-mass.

  With a `mesh` whose "tensor" axis splits the vocabulary (the logical rules put it there) and
  divides it, the top-k is taken vocab-parallel (`topk.extract_vocab_parallel`: each shard's
  top-k, a merge of the K x shards candidates, ids bit-identical, no [B, L, V] gather); the
  extraction programs and the online step both come here."""
  n = 1 if mesh is None else mesh.shape.get("tensor", 1)
  vocab = teacher_logits_BxLxV.shape[-1]
  if n > 1 and vocab % n == 0 and k <= vocab // n:
    logprobs_BxLxK, ids_BxLxK, tail_BxL = topk.extract_vocab_parallel(
        teacher_logits_BxLxV, k, mesh, "tensor", leading_spec=(("data", "fsdp"), None))
  else:
    logprobs_BxLxK, ids_BxLxK, tail_BxL = topk.extract(teacher_logits_BxLxV, k)
  return {"teacher_logprobs": logprobs_BxLxK, "teacher_ids": ids_BxLxK, "teacher_tail": tail_BxL}


def teacher_sampled(teacher_logits_BxLxV: jax.Array, num: int, t: jax.Array,
                    keys_BxL: jax.Array) -> dict[str, jax.Array]:
  """A priority sample of U = `num` tokens of softmax(teacher / t) per position, as targets
  (`sampled.priority_sample`; "teacher_tail" holds log tau). Logits split over the vocabulary
  (a "tensor" mesh axis) are left to the SPMD partitioner: the noise is partitionable threefry,
  so the draw does not depend on the mesh (ids bit-identical on 1x8, tests/test_sampled.py);
  unlike `teacher_topk`, no hand-written shard_map bounds its communication."""
  logprobs_BxLxU, ids_BxLxU, log_tau_BxL = sampled.priority_sample(teacher_logits_BxLxV, num, t,
                                                                   keys_BxL)
  return {"teacher_logprobs": logprobs_BxLxU, "teacher_ids": ids_BxLxU,
          "teacher_tail": log_tau_BxL}


def sample_positions(batch: dict[str, jax.Array], spec: LossSpec) -> jax.Array:
  """[B, P] the positions the teacher's logits stand for: the answer position (answer-only)
  or every position."""
  if spec.answer_only:
    return batch["answer_pos"][:, None]
  b, l = batch["input_ids"].shape
  return jnp.broadcast_to(jnp.arange(l), (b, l))


def add_events(buf: dict[str, jax.Array], targets: dict[str, jax.Array],
               batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The buffer with this batch's positions (weight = loss mask) over its oldest slots."""
  k, size = targets["teacher_ids"].shape[-1], buf["weight"].shape[0]
  new = {"logprobs": targets["teacher_logprobs"].reshape(-1, k).astype(jnp.float32),
         "ids": targets["teacher_ids"].reshape(-1, k).astype(jnp.int32),
         "tail": targets["teacher_tail"].reshape(-1).astype(jnp.float32),
         "target": batch["targets"].reshape(-1).astype(jnp.int32),
         "weight": batch["loss_mask"].reshape(-1).astype(jnp.float32)}
  if "choice_ids" in buf:  # the question's choices at each of its positions
    c_BxC = batch["choice_ids"]
    per_row = new["weight"].shape[0] // c_BxC.shape[0]
    new["choice_ids"] = jnp.repeat(c_BxC, per_row, axis=0).astype(jnp.int32)
  n = new["weight"].shape[0]
  if n > size:  # more positions than slots: the latest `size` of them
    new = {key: v[n - size:] for key, v in new.items()}
    n = size
  idx = (buf["next"] + jnp.arange(n)) % size
  out = {key: buf[key].at[idx].set(v) for key, v in new.items()}
  out["next"] = (buf["next"] + n) % size
  return out


def searched_temperature(buf: dict[str, jax.Array], spec: LossSpec) -> jax.Array:
  """ECE-minimising temperature over the buffered events: the teacher's top-1 (or its most
  likely choice) against the actual next token."""
  result = temperature.search(
      buf["logprobs"], buf["ids"], buf["target"], mode=spec.temperature_mode,
      num_bins=spec.num_bins, weights_N=buf["weight"],
      tail_logmass_N=buf["tail"] if spec.tail == "bucket" else None,
      choice_ids_NxC=buf.get("choice_ids"))
  return result.best_t


def kd_loss_parts(student_logits_BxLxV: jax.Array, targets: dict[str, jax.Array],
                  mask_BxL: jax.Array, t: jax.Array, spec: LossSpec) -> tuple[jax.Array, jax.Array]:
  """Rescale the teacher's top-k with temperature t (unless plain KD), then top-k KL."""
  logprobs_BxLxK = targets["teacher_logprobs"].astype(jnp.float32)
  tail_BxL = targets["teacher_tail"].astype(jnp.float32) if spec.tail == "bucket" else None
  if spec.temperature_mode is not None:
    scaled = temperature.rescale(logprobs_BxLxK, t, spec.temperature_mode, tail_BxL)
    if tail_BxL is not None:
      logprobs_BxLxK, tail_BxL = scaled[..., :-1], scaled[..., -1]
    else:
      logprobs_BxLxK = scaled
  return losses.topk_kd(student_logits_BxLxV, targets["teacher_ids"], logprobs_BxLxK, mask_BxL,
                        tail=spec.tail, direction=spec.direction,
                        teacher_tail_logmass_BxL=tail_BxL)


def at_answer(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-position batch entries gathered at each row's answer position (length 1)."""
  pos_B = batch["answer_pos"]
  out = dict(batch)
  for key in ("targets", "loss_mask", "teacher_ids", "teacher_logprobs", "teacher_tail"):
    if key in batch:
      x = batch[key]
      idx = pos_B.reshape((-1, 1) + (1,) * (x.ndim - 2))
      out[key] = jnp.take_along_axis(x, idx, axis=1)
  return out


def student_logits(params: Any, batch: dict[str, jax.Array], apply: Apply,
                   spec: LossSpec) -> jax.Array:
  """logits_BxLxV, or logits_Bx1xV at the answer positions when `spec.answer_only`."""
  if not spec.answer_only:
    return apply(params, batch["input_ids"], batch["attention_mask"])
  h_BxLxD = apply(params, batch["input_ids"], batch["attention_mask"], hidden_only=True)
  h_Bx1xD = jnp.take_along_axis(h_BxLxD, batch["answer_pos"][:, None, None], axis=1)
  return apply(params, h_Bx1xD, head_only=True)


def loss_fn(student_params: Any, state: TrainState, batch: dict[str, jax.Array],
            teacher_params: Any, *, student_apply: Apply, teacher_apply: Apply | None,
            spec: LossSpec, mesh=None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
  """Token-mean loss, with (sum, count) metrics and the temperature used. `mesh`: the online
  teacher's top-k is taken vocab-parallel on it (`teacher_topk`)."""
  logits_BxLxV = student_logits(student_params, batch, student_apply, spec)
  full_batch = batch
  if spec.answer_only:
    batch = at_answer(batch)
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  t, events = state.temperature, state.events
  if spec.kind == "ce":
    smooth_ids = None
    if spec.smooth_over == "choices":  # the question's letters at every (scored) position
      c_BxC = batch["choice_ids"]
      smooth_ids = jnp.broadcast_to(c_BxC[:, None, :], mask_BxL.shape + c_BxC.shape[-1:])
    loss_sum, count = losses.cross_entropy(logits_BxLxV, batch["targets"], mask_BxL,
                                           label_smoothing=spec.label_smoothing,
                                           smoothing_ids_BxLxC=smooth_ids)
  else:
    teacher_logits = None
    if spec.online:
      teacher_logits = jax.lax.stop_gradient(
          student_logits(teacher_params, full_batch, teacher_apply, spec))
    if spec.kind == "full_kd":
      loss_sum, count = losses.full_kd(logits_BxLxV, teacher_logits, mask_BxL,
                                       temperature=t, scale_by_t2=True)
    elif spec.kind == "sampled_kd":
      targets = batch
      if spec.online:  # a fresh draw each step, per (step, row, position)
        key = jax.random.fold_in(jax.random.key(spec.sample_seed), state.step)
        rows_B = jnp.arange(full_batch["input_ids"].shape[0])
        targets = teacher_sampled(teacher_logits, spec.samples, t,
                                  sampled.position_keys(key, rows_B,
                                                        sample_positions(full_batch, spec)))
      loss_sum, count = losses.sampled_kd(logits_BxLxV, targets["teacher_ids"],
                                          targets["teacher_logprobs"], targets["teacher_tail"],
                                          mask_BxL)
    else:
      targets = teacher_topk(teacher_logits, spec.k, mesh) if spec.online else batch
      if spec.search:
        events = add_events(events, jax.lax.stop_gradient(targets), batch)
        best_t = searched_temperature(events, spec)
        enough = jnp.sum(events["weight"] > 0) >= spec.search_min_events
        t = jnp.where(enough, spec.ema * t + (1.0 - spec.ema) * best_t, t)
      loss_sum, count = kd_loss_parts(logits_BxLxV, targets, mask_BxL, t, spec)
  loss = loss_sum / jnp.maximum(count, 1.0)
  metrics = {"loss": (loss_sum, count), "temperature": (t, jnp.ones(()))}
  return loss, (metrics, (t, events))


def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None, *,
               student_apply: Apply, teacher_apply: Apply | None, spec: LossSpec,
               tx: optax.GradientTransformation, mesh=None) -> tuple[TrainState, dict]:
  """One optimizer update of the student; the teacher (if any) only runs forward."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (metrics, (t, events))), grads = grad_fn(state.params, state, batch, teacher_params,
                                     student_apply=student_apply, teacher_apply=teacher_apply,
                                     spec=spec, mesh=mesh)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  metrics["grad_norm"] = (grad_norm, jnp.ones(()))
  metrics["skipped"] = ((~jnp.isfinite(grad_norm)).astype(jnp.float32), jnp.ones(()))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            temperature=t.astype(jnp.float32), events=events)
  return new_state, metrics
