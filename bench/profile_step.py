"""Where the training step's time goes: first_jax's jitted step and the PyTorch step of
bench.run's `step` section, profiled op by op on the same batch (issue 11).

    python -m bench.profile_step --out docs/benchmarks/profile_step.json [--steps 3]
                                 [--batch 8 --length 128] [--dtype float32|bfloat16]

first_jax: `jax.profiler.trace` over --steps steps after a warm-up; every XLA:CPU thunk's time
from the trace, named by the compiled HLO instruction it runs (its op_name metadata: the
model scope, forward / backward (`transpose(jvp(...))`) / optimizer) and grouped into
categories (matmuls per layer part, the output head and its softmax, the embedding, the
optimizer, the rest). PyTorch: `torch.profiler` over the same number of steps, its ops grouped
the same way where their names allow. Times are per step (the trace's total over the steps /
steps). Run it on a quiet machine: shares are what it is for; bench.run gives the speeds.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import MODES, Context, Settings, compile_train_step, environment, log
from bench.sections.step import step_inputs

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata (fusions: their own, else the root's)."""
  out: dict[str, str] = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      op = _OP_NAME.search(m.group(2))
      if op:
        out.setdefault(m.group(1), op.group(1))
  return out


def category(op_name: str, kind: str) -> str:
  """A coarse part of the step for an op_name (jax name stack) and its thunk kind."""
  phase = ("backward" if "transpose(" in op_name else
           "forward" if "jvp(" in op_name else "optimizer/other")
  is_dot = kind in ("dot", "ynn", "onednn") or "dot_general" in op_name
  part = "other"
  for key, name in (("logits_from_hidden", "output head"), ("embed", "embedding"),
                    ("_proj", "attention projections" if "/attn/" in op_name else "mlp"),
                    ("/attn/", "attention core"), ("/mlp/", "mlp"), ("norm", "norms"),
                    ("/cond/", "optimizer"), ("jvp()", "loss"), ("jvp(Decoder)", "decoder")):
    if key in op_name:
      part = name
      break
  return f"{phase} | {part} | {'matmul' if is_dot else 'non-matmul'}"


# thunks that only run others (their trace events span their children's)
_CONTAINERS = ("while", "cond", "conditional", "call", "closed_call")


def _thunk_kind(name: str) -> str:
  base = name.split(".")[0]
  if base.startswith("ynn"):
    return "ynn"
  if base.startswith("onednn"):
    return "onednn"
  return "dot" if base.startswith("dot") else base


def jax_profile(fn, steps: int, hlo_text: str) -> dict[str, Any]:
  import jax
  names = hlo_op_names(hlo_text)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        fn()
      wall = (time.perf_counter() - t0) / steps
    path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_thunk: dict[str, float] = collections.Counter()
  for e in events:
    if (e.get("ph") == "X" and e.get("name") in names
        and e["name"].split(".")[0] not in _CONTAINERS):
      per_thunk[e["name"]] += e.get("dur", 0.0) / 1e6 / steps
  cats: dict[str, float] = collections.Counter()
  for name, s in per_thunk.items():
    cats[category(names[name], _thunk_kind(name))] += s
  busy = sum(per_thunk.values())
  top = sorted(per_thunk.items(), key=lambda kv: -kv[1])[:40]
  return {"wall_s_per_step": wall, "thunk_s_per_step": busy,
          "categories_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
          "top_thunks": [{"thunk": n, "s": s, "op_name": names[n]} for n, s in top]}


def torch_profile(step_fn, steps: int) -> dict[str, Any]:
  import torch
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      step_fn()
    wall = (time.perf_counter() - t0) / steps
  rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6 / steps, "calls": e.count // steps}
          for e in prof.key_averages()]
  rows.sort(key=lambda r: -r["self_s"])
  matmul = sum(r["self_s"] for r in rows if r["op"] in ("aten::mm", "aten::addmm", "aten::bmm",
                                                         "aten::matmul", "aten::linear"))
  del torch
  return {"wall_s_per_step": wall, "self_s_per_step": sum(r["self_s"] for r in rows),
          "matmul_self_s": matmul, "top_ops": rows[:40]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="docs/benchmarks/profile_step.json")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=128)
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--text", default="botchan", choices=("botchan", "embedded", "random"))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype of both steps (PyTorch: torch.autocast), as bench.run's")
  ap.add_argument("--no-torch", action="store_true")
  a = ap.parse_args(argv)
  import jax
  import torch
  from bench import baselines_torch
  from first_jax.runtime import sharding
  from first_jax.core import step
  s = Settings(mode="full", **{**MODES["full"], "batch": a.batch, "length": a.length,
                               "model": a.model, "text": a.text,
                               "dtype": a.dtype})
  ctx = Context(s)
  try:
    batch, opt, tx = step_inputs(ctx, s)  # as bench.run's step section
    state, step_fn, _ = compile_train_step(ctx.model.module, ctx.model.params,
                                           step.LossSpec(kind="ce"), tx, ctx.mesh)
    bsh = sharding.batch_sharding(ctx.mesh)
    hold = {"state": state}
    del state
    hlo = step_fn.lower(hold["state"], jax.device_put(batch, bsh), None).compile().as_text()

    def one():
      st, _ = step_fn(hold["state"], jax.device_put(batch, bsh), None)
      hold["state"] = jax.block_until_ready(st)
    for _ in range(2):
      one()
    log(f"profiling first_jax's step, {a.steps} steps")
    out = {"meta": environment(), "shapes": [a.batch, a.length], "dtype": a.dtype,
           "first_jax": jax_profile(one, a.steps, hlo)}
    hold.clear()
    if not a.no_torch:
      tmodel = baselines_torch.load_causal_lm(ctx.hf_dir, train=True)
      tstep = baselines_torch.TrainStep(tmodel, **opt, dtype=a.dtype)
      tb = {k: torch.from_numpy(v.astype(np.float32 if k == "loss_mask" else np.int64))
            for k, v in batch.items()}
      run = lambda: tstep(tb["input_ids"], tb["attention_mask"], tb["targets"],  # noqa: E731
                          tb["loss_mask"])
      for _ in range(2):
        run()
      log(f"profiling the PyTorch step, {a.steps} steps")
      out["torch"] = torch_profile(run, a.steps)
  finally:
    ctx.close()
  tmp = a.out + ".tmp"
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, a.out)
  fj = out["first_jax"]
  print(f"first_jax: {fj['wall_s_per_step']:.2f} s/step, thunks {fj['thunk_s_per_step']:.2f} s")
  for k, v in list(fj["categories_s"].items())[:15]:
    print(f"  {v:7.3f} s  {k}")
  if "torch" in out:
    t = out["torch"]
    print(f"torch: {t['wall_s_per_step']:.2f} s/step, matmul self {t['matmul_self_s']:.2f} s")
    for r in t["top_ops"][:10]:
      print(f"  {r['self_s']:7.3f} s  {r['op']} x{r['calls']}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
