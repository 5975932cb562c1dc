"""bench/run.py's extraction section: extraction (teacher forward + top-k) and the post-forward
work, against transformers' PyTorch and the reference code."""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from bench.common import (Context, forward_flops, interleaved, log, ratio, sample_program,
                          Settings, topk_program)


def section_extraction(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax.runtime import sharding
  b, l, k = s.batch, s.length, s.k
  ids = ctx.windows(0, b, l)
  mask = np.ones((b, l), np.int32)
  frozen = ctx.model.for_inference()  # as extract.run: kernels cast to the compute dtype once
  params = frozen.params
  fn, how = topk_program(frozen.module, params, k, ctx.mesh)
  fn_s, how_s = sample_program(frozen.module, params, s.samples, ctx.mesh)
  batch_sh = sharding.batch_sharding(ctx.mesh)
  tmodel = ctx.torch_model
  ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def first_jax():  # as extract.run_topk: host batch -> device, program, top-k back to host
    dev = jax.device_put({"input_ids": ids, "attention_mask": mask}, batch_sh)
    return jax.device_get(fn(params, dev))

  def first_jax_sampled():  # the sample stage's program: forward + priority sample of U tokens
    dev = jax.device_put({"input_ids": ids, "attention_mask": mask,
                          "example_id": np.arange(b, dtype=np.int32)}, batch_sh)
    return jax.device_get(fn_s(params, dev))

  def torch_fn():
    return baselines_torch.extract(tmodel, ids_t, mask_t, k, s.dtype)

  log(f"extraction: [{b}, {l}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "first_jax_sampled": first_jax_sampled,
                   "torch": torch_fn}, s.warmup, s.reps)
  a, r = first_jax(), torch_fn()
  same = a["teacher_ids"] == r["ids"]
  agree = {"top1_same_id": float(same[..., 0].mean()), "topk_same_ids": float(same.mean()),
           "max_abs_logprob_diff_where_same": float(
               np.abs(a["teacher_logprobs"] - r["logprobs"])[same].max()) if same.any() else None,
           "max_abs_tail_diff": float(np.abs(a["teacher_tail"] - r["tail"]).max())}
  flops = forward_flops(ctx.model.config, b, l)
  tokens = b * l
  out = {"shapes": {"input_ids": [b, l], "logits": [b, l, ctx.model.config.vocab_size],
                    "topk": [b, l, k]},
         "what": {"first_jax": f"{how}: forward + topk.extract in one jitted program; "
                               "device_put in, device_get out",
                  "first_jax_sampled": f"{how_s}: forward + sampled.priority_sample of "
                                       f"{s.samples} tokens (full-vocabulary log-sum-exp, "
                                       "Exp(1) noise over [B, L, V], top-(U+1)) in one program",
                  "torch": "transformers AutoModelForCausalLM (first_jax's HF export), "
                           "torch.no_grad(), logits -> log_softmax -> batched torch.topk -> tail"},
         "torch_attn_implementation": baselines_torch.attn_implementation(tmodel),
         "timings": t,
         "tokens_per_s": {n: tokens / v["median_s"] for n, v in t.items()},
         "speedup_vs_torch": ratio(t["torch"]["median_s"], t["first_jax"]["median_s"]),
         "sampled_vs_topk_time": ratio(t["first_jax_sampled"]["median_s"],
                                       t["first_jax"]["median_s"]),
         "forward_flops": flops, "agreement": agree}
  peak = ctx.peak()["peak_flops_per_s"]
  out["mfu"] = {n: flops["total"] / v["median_s"] / peak for n, v in t.items()}
  return out


def section_postforward(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  import torch
  from bench import baselines_torch
  from first_jax.core import step
  from first_jax.data import store
  b, l, k = s.batch, s.length, s.k
  v = ctx.model.config.vocab_size
  ids = ctx.windows(0, b, l)
  logits = baselines_torch.logits(ctx.torch_model, ids, np.ones((b, l), np.int32))
  logits_dev = jax.block_until_ready(jax.device_put(logits))  # "given logits": on the device
  logits_t = torch.from_numpy(logits)
  topk = jax.jit(functools.partial(step.teacher_topk, k=k))
  folder = os.path.join(ctx.tmp, "postforward_store")
  spec = store.StoreSpec(k=k, vocab_size=v, seq_len=l, positions=l)  # every position scored
  writer = store.StoreWriter(folder, spec)
  example_idx, scored = np.arange(b), np.ones((b, l), bool)
  jsonl_path = os.path.join(ctx.tmp, "reference.jsonl")
  held: dict[str, Any] = {}

  def top_only():
    held["top"] = jax.device_get(topk(logits_dev))

  def write_only():
    top = held["top"]
    writer.write_shard(0, example_idx, ids, top["teacher_ids"], top["teacher_logprobs"],
                       top["teacher_tail"], scored)

  def first_jax():
    top_only()
    write_only()

  def reference():
    baselines_torch.reference_postforward(logits_t, k, jsonl_path)

  # where the top-k program's time goes on this backend: XLA's top_k alone, and one reduction
  # pass over the logits with an exp per element (what the tail/normaliser pass does) against
  # one with a multiply-add per element
  import jax.numpy as jnp
  parts = {"xla_top_k": jax.jit(lambda x: jax.lax.top_k(x, k)),
           "xla_exp_sum_pass": jax.jit(lambda x: jnp.sum(jnp.exp(x - x[..., :1]), -1)),
           "xla_mul_sum_pass": jax.jit(lambda x: jnp.sum(x * x, -1))}
  part_fns = {n: functools.partial(lambda f: jax.block_until_ready(f(logits_dev)), f)
              for n, f in parts.items()}
  log(f"postforward: logits [{b}, {l}, {v}], warmup {s.warmup}, reps {s.reps}")
  t = interleaved({"first_jax": first_jax, "reference": reference,
                   "first_jax_topk_only": top_only, "first_jax_write_only": write_only,
                   **part_fns}, s.warmup, s.reps)
  written = {"first_jax_store": store.store_size_bytes(folder),
             "reference_jsonl": os.path.getsize(jsonl_path)}
  return {"shapes": {"logits": [b, l, v], "topk": [b, l, k], "store_positions": l},
          "what": {"first_jax": "jit(step.teacher_topk) on device logits -> device_get -> "
                                "StoreWriter.write_shard (bit packing, float16, sha256, "
                                "atomic shard + manifest)",
                   "reference": "torch.log_softmax over V, batched torch.topk, Python loop over "
                                "positions building {id: logprob} dicts with .item(), "
                                "json.dumps per example row to a JSONL file",
                   "first_jax_topk_only / first_jax_write_only": "the two halves of first_jax",
                   "xla_*": "parts: lax.top_k alone; one reduction over the logits with an exp "
                            "per element; one with a multiply-add per element"},
          "timings": t,
          "positions_per_s": {n: b * l / x["median_s"] for n, x in t.items()},
          "speedup_vs_reference": ratio(t["reference"]["median_s"], t["first_jax"]["median_s"]),
          "bytes_written": written,
          "bytes_per_position": {n: x / (b * l) for n, x in written.items()}}
