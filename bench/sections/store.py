"""bench/run.py's store section: bytes per stored token, the store's size against the reference
code's JSONL and dense logits, the teacher's top-k mass share."""
from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import Context, log, ratio, Settings, STORE_VOCABS, topk_program


# (seq_len L, stored positions P) of the store layouts reported
STORE_LAYOUTS = {
    "multiple_choice": (96, 1),  # one answer position per example (what a store v2 keeps)
    "multiple_choice_all_positions": (96, 96),  # every position stored (the old layout)
    "text_responses": (512, 256),  # instruction data: half of each row is the response
    "text_all_positions": (512, 512),
}
HEADLINE_STORE = (151_936, "text_responses")


def store_arithmetic(k: int = 5, vocabs=STORE_VOCABS, layouts=None,
                     samples: int | None = None) -> dict[str, Any]:
  """Store sizes from first_jax.data.store's own StoreSpec (no data needed); with `samples`,
  also a sampled store's (U = samples slots per position, first_jax.core.sampled) beside it."""
  from first_jax.data import store
  layouts = layouts or STORE_LAYOUTS
  out = {}
  for v in vocabs:
    per = {}
    for name, (length, positions) in layouts.items():
      spec = store.StoreSpec(k=k, vocab_size=v, seq_len=length, positions=positions)
      per[name] = {"seq_len": length, "positions": positions, "id_bits": spec.id_bits,
                   "layout": {f: list(x) for f, x in spec.layout.items()},
                   "bytes_per_example": store.bytes_per_example(spec),
                   "bytes_per_scored_token": store.bytes_per_scored_token(spec)}
      if samples:
        sp = store.StoreSpec(k=samples, vocab_size=v, seq_len=length, positions=positions,
                             sampling={"sampler": "priority"})
        per[name]["sampled"] = {
            "samples": samples, "bytes_per_example": store.bytes_per_example(sp),
            "bytes_per_scored_token": store.bytes_per_scored_token(sp),
            "vs_topk": ratio(store.bytes_per_scored_token(sp),
                             store.bytes_per_scored_token(spec))}
    out[str(v)] = {"layouts": per, "dense_bf16_bytes_per_position": 2 * v}
  return out


def _mass_share(ctx: Context, s: Settings) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Top-k over `mass_batches` text batches with first_jax's extraction program (k = mass_k).

  Returns (the share summary, the top-`s.k` ids [N, L, k], their log-probs [N, L, k]).
  """
  import jax
  from first_jax.runtime import sharding
  params, module = ctx.model.params, ctx.model.module
  fn, _ = topk_program(module, params, s.mass_k, ctx.mesh)
  lps, ids = [], []
  mask = np.ones((s.batch, s.length), np.int32)
  for i in range(s.mass_batches):
    x = ctx.windows(i * s.batch, s.batch, s.length)
    dev = jax.device_put({"input_ids": x, "attention_mask": mask},
                         sharding.batch_sharding(ctx.mesh))
    out = jax.device_get(fn(params, dev))
    lps.append(np.asarray(out["teacher_logprobs"], np.float32))
    ids.append(np.asarray(out["teacher_ids"]))
  lp, ids = np.concatenate(lps), np.concatenate(ids)
  mass = np.cumsum(np.exp(lp.astype(np.float64)), axis=-1)  # [N, L, mass_k]
  share = {}
  for kk in sorted({1, s.k, 10, s.mass_k}):
    if kk > s.mass_k:
      continue
    m = mass[..., kk - 1].reshape(-1)
    share[str(kk)] = {"mean": float(m.mean()), "median": float(np.median(m)),
                      "p10": float(np.percentile(m, 10)), "p25": float(np.percentile(m, 25)),
                      "p90": float(np.percentile(m, 90)), "min": float(m.min())}
  return {"positions": int(lp.shape[0] * lp.shape[1]), "windows": int(lp.shape[0]),
          "window_length": s.length, "text": ctx.text_source,
          "how": "teacher top-k log-probs (full-vocabulary normalised) at every position of "
                 "consecutive text windows, no BOS; share = sum of the top-k probabilities",
          "share_by_k": share}, ids[..., :s.k], lp[..., :s.k]


def section_store(ctx: Context, s: Settings) -> dict[str, Any]:
  from bench import baselines_torch
  out: dict[str, Any] = {"k": s.k, "samples": s.samples,
                         "by_vocab": store_arithmetic(s.k, samples=s.samples)}
  log("store: top-k mass share on text")
  mass, real_ids, real_lp = _mass_share(ctx, s)
  out["topk_mass_share"] = mass
  n_pos = real_lp.shape[0] * real_lp.shape[1]
  rng = np.random.default_rng(s.seed)
  teacher_v = ctx.model.config.vocab_size
  for v in STORE_VOCABS:
    entry = out["by_vocab"][str(v)]
    uniform_ids = rng.integers(0, v, real_ids.shape)
    jsonl = {"uniform_ids": baselines_torch.jsonl_bytes(uniform_ids, real_lp) / n_pos}
    if v == teacher_v:
      jsonl["teacher_ids"] = baselines_torch.jsonl_bytes(real_ids, real_lp) / n_pos
    entry["reference_jsonl_bytes_per_position"] = jsonl
    entry["reference_jsonl_how"] = (
        f"json.dumps of one list of {{token_id: logprob}} dicts per example row, values the "
        f"teacher's real top-{s.k} log-probs as Python floats of float32 (.item()), ids "
        "uniform over V ('uniform_ids') or the teacher's own ('teacher_ids', when its V is this "
        f"one); {n_pos} positions")
    text = entry["layouts"]["text_responses"]["bytes_per_scored_token"]
    full = entry["layouts"]["text_all_positions"]["bytes_per_scored_token"]
    worst_jsonl = min(jsonl.values())  # the smaller JSONL: the ratio is not overstated
    entry["store_vs_reference_jsonl"] = {"text_responses": ratio(worst_jsonl, text),
                                         "text_all_positions": ratio(worst_jsonl, full)}
    entry["store_vs_dense_bf16"] = {"text_responses": ratio(2 * v, text),
                                    "text_all_positions": ratio(2 * v, full)}
    mc = entry["layouts"]["multiple_choice"]["bytes_per_example"]
    mc_all = entry["layouts"]["multiple_choice_all_positions"]["bytes_per_example"]
    entry["multiple_choice_bytes_per_example"] = {"scored_only": mc, "all_positions": mc_all,
                                                  "ratio": ratio(mc_all, mc)}
  v, layout = HEADLINE_STORE
  head = out["by_vocab"][str(v)]["layouts"][layout]
  out["headline"] = {"vocab": v, "layout": layout,
                     **{k: head[k] for k in ("seq_len", "positions", "bytes_per_scored_token")},
                     "sampled_bytes_per_scored_token": head["sampled"]["bytes_per_scored_token"],
                     "sampled_vs_topk": head["sampled"]["vs_topk"]}
  return out
