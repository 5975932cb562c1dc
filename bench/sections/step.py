"""bench/run.py's step section: one training step (cross-entropy and offline top-k KD) against a
PyTorch AdamW step, with MFU."""
from __future__ import annotations

import dataclasses
import functools
import gc
from typing import Any

import numpy as np

from bench.common import (compile_train_step, Context, forward_flops, interleaved, log, ratio,
                          Settings, topk_program)


def step_inputs(ctx: Context, s: Settings) -> tuple[dict[str, np.ndarray], dict, Any]:
  """The [B, L] cross-entropy batch of text windows, the AdamW settings, and first_jax's
  optimizer as trainer.train_model builds it (constant lr: no warmup, a long decay)."""
  from first_jax.core import step
  b, l = s.batch, s.length
  w = ctx.windows(0, b, l + 1)  # L + 1 tokens: inputs and their next tokens
  batch = {"input_ids": w[:, :-1].copy(), "attention_mask": np.ones((b, l), np.int32),
           "targets": w[:, 1:].copy(), "loss_mask": np.ones((b, l), np.float32)}
  opt = dict(lr=s.lr, weight_decay=s.weight_decay, clip_norm=s.clip_norm, b1=s.b1, b2=s.b2,
             eps=s.eps)
  return batch, opt, step.make_optimizer(total_steps=1_000_000, warmup_ratio=0.0, **opt)


def params_copy(ctx: Context) -> Any:
  """A copy of the ctx's params in the same layout (a step donates its state)."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: jax.device_put(jnp.copy(x), x.sharding), ctx.model.params)


def section_step(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax import models
  from first_jax.runtime import sharding
  from first_jax.core import step
  b, l = s.batch, s.length
  peak = ctx.peak()  # before the big allocations
  batch, opt, tx = step_inputs(ctx, s)
  params = params_copy(ctx)  # the state is donated
  state, step_fn, how = compile_train_step(ctx.model.module, params, step.LossSpec(kind="ce"),
                                           tx, ctx.mesh)
  del params
  batch_sh = sharding.batch_sharding(ctx.mesh)
  holder: dict[str, Any] = {"state": state, "loss": []}
  del state

  def first_jax():  # as trainer.fit: put_batch (device_put over the batch sharding), step
    st, metrics = step_fn(holder["state"], jax.device_put(batch, batch_sh), None)
    holder["state"] = jax.block_until_ready(st)
    if len(holder["loss"]) < 1:
      total, count = jax.device_get(metrics["loss"])
      holder["loss"].append(float(total / max(count, 1.0)))

  # PyTorch: its own copy of the same export (the step changes the weights)
  tmodel = baselines_torch.load_causal_lm(ctx.hf_dir, train=True)
  tstep = baselines_torch.TrainStep(tmodel, **opt, dtype=s.dtype)
  tb = {k: torch.from_numpy(v.astype(np.float32 if k == "loss_mask" else np.int64))
        for k, v in batch.items()}
  tloss: list[float] = []

  def torch_fn():
    loss = tstep(tb["input_ids"], tb["attention_mask"], tb["targets"], tb["loss_mask"])
    if not tloss:
      tloss.append(loss)

  # the same step compiled without the CPU options of `xla_options` (what they bring)
  plain_fn = jax.jit(functools.partial(step.train_step, student_apply=models.apply_fn(
      ctx.model.module), teacher_apply=None, spec=step.LossSpec(kind="ce"), tx=tx),
      donate_argnums=0)
  plain_holder = {"state": step.init_state(params_copy(ctx), tx)}

  def first_jax_xla_default():
    st, metrics = plain_fn(plain_holder["state"], jax.device_put(batch, batch_sh), None)
    plain_holder["state"] = jax.block_until_ready(st)
    if "loss" not in plain_holder:
      total, count = jax.device_get(metrics["loss"])
      plain_holder["loss"] = float(total / max(count, 1.0))

  log(f"step: [{b}, {l}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "torch": torch_fn,
                   "first_jax_xla_default": first_jax_xla_default}, s.warmup, s.reps)
  fwd = forward_flops(ctx.model.config, b, l)
  train_flops = 3.0 * fwd["total"]  # backward = 2 x forward
  out = {"shapes": {"input_ids": [b, l], "logits": [b, l, ctx.model.config.vocab_size]},
         "what": {"first_jax": f"{how}, spec=LossSpec(kind='ce'), tx=step.make_optimizer"
                               "(...); device_put of the batch included",
                  "torch": "transformers model.train(), zero_grad, forward, masked token-mean "
                           "cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW.step",
                  "first_jax_xla_default": "the same step.train_step, jax.jit with donation "
                                           "and no compiler_options (XLA's defaults), its own "
                                           "copy of the state"},
         "optimizer": opt, "torch_attn_implementation": baselines_torch.attn_implementation(tmodel),
         "loss_at_first_step": {"first_jax": holder["loss"][0] if holder["loss"] else None,
                                "torch": tloss[0] if tloss else None,
                                "first_jax_xla_default": plain_holder.get("loss")},
         "timings": t,
         "tokens_per_s": {n: b * l / v["median_s"] for n, v in t.items()},
         "speedup_vs_torch": ratio(t["torch"]["median_s"], t["first_jax"]["median_s"]),
         "speedup_from_xla_options": ratio(t["first_jax_xla_default"]["median_s"],
                                           t["first_jax"]["median_s"]),
         "train_flops_per_step": train_flops,
         "flops_convention": "3 x forward matmul FLOPs (bench.run.forward_flops)",
         "peak_flops_per_s": peak["peak_flops_per_s"],
         "mfu": {n: train_flops / v["median_s"] / peak["peak_flops_per_s"]
                 for n, v in t.items()}}
  holder.clear()
  plain_holder.clear()
  del tstep, tmodel
  gc.collect()
  out["kd"] = _kd_step(ctx, s, batch, tx, opt)
  kd_median = out["kd"]["timings"]["first_jax_kd"]["median_s"]
  out["tokens_per_s"]["first_jax_kd"] = b * l / kd_median
  out["mfu"]["first_jax_kd"] = train_flops / kd_median / peak["peak_flops_per_s"]
  out["kd"]["time_vs_ce"] = ratio(kd_median, t["first_jax"]["median_s"])
  return out


def _kd_step(ctx: Context, s: Settings, batch: dict[str, np.ndarray], tx,
             opt: dict[str, float]) -> dict[str, Any]:
  """first_jax's offline top-k KD step (FIRST's distill stage with stored targets), timed on
  its own after the ce-vs-torch comparison: the teacher's top-k of the batch (first_jax's
  extraction program on the same model) in the batch keys the store fills."""
  import jax
  from first_jax.runtime import sharding
  from first_jax.core import step
  b, l = batch["input_ids"].shape
  batch_sh = sharding.batch_sharding(ctx.mesh)
  fn, _ = topk_program(ctx.model.module, ctx.model.params, s.k, ctx.mesh)
  top = jax.device_get(fn(ctx.model.params, jax.device_put(
      {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch_sh)))
  kd_batch = {**batch, "teacher_ids": np.asarray(top["teacher_ids"], np.int32),
              "teacher_logprobs": np.asarray(top["teacher_logprobs"], np.float32),
              "teacher_tail": np.asarray(top["teacher_tail"], np.float32)}
  # as train.parse_variant builds "first" with the default distill config, offline
  spec = step.LossSpec(kind="topk_kd", k=s.k, tail="bucket", direction="forward",
                       temperature_mode="prob_softmax", num_bins=10)
  params = params_copy(ctx)
  state, step_fn, how = compile_train_step(ctx.model.module, params, spec, tx, ctx.mesh)
  del params
  holder: dict[str, Any] = {"state": state, "loss": []}
  del state

  def first_jax_kd():
    st, metrics = step_fn(holder["state"], jax.device_put(kd_batch, batch_sh), None)
    holder["state"] = jax.block_until_ready(st)
    if not holder["loss"]:
      total, count = jax.device_get(metrics["loss"])
      holder["loss"].append(float(total / max(count, 1.0)))

  log(f"step (offline top-k KD): [{b}, {l}], k={s.k}, warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax_kd": first_jax_kd}, s.warmup, s.reps)
  out = {"what": f"{how}, spec=LossSpec(kind='topk_kd', tail='bucket', direction='forward', "
                 "temperature_mode='prob_softmax'), initial temperature 1; batch keys "
                 "teacher_ids / teacher_logprobs / teacher_tail (the teacher's top-k of the "
                 "batch, as the store gives them); device_put of the batch included; timed after "
                 "the ce-vs-torch repetitions, not interleaved with them; no torch baseline",
         "spec": dataclasses.asdict(spec), "optimizer": opt,
         "shapes": {"input_ids": [b, l], "teacher_topk": [b, l, s.k]},
         "loss_at_first_step": holder["loss"][0] if holder["loss"] else None,
         "timings": t}
  holder.clear()
  gc.collect()
  return out
