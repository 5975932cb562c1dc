"""first_jax against what a user would run instead, side by side in one run (issue 11).

    python -m bench.run --quick [--out FILE.json] [--only store,extraction,postforward,step,...]
    python -m bench.run --full --out FILE.json        # the figures for docs/benchmarks.md

Run from the repository root on a quiet machine: every section times first_jax and its baseline
in the same process, warm-up calls first, then repetitions in which the two alternate (the order
flips every repetition, so a slow drift of the machine hits both); the JSON keeps every time,
the median and the spread (min, max, quartiles), the CPU model, core count, library versions,
date, git commit and the exact shapes. Ratios measured in one run are the figures to quote.

Sections (each a function `ctx, settings -> dict`):
  store        bytes per stored token at k=5 for V = 49,152 and 151,936 (first_jax.data.store's
               StoreSpec arithmetic) vs the reference code's JSONL (measured: real top-5 values
               json-dumped as it does) and vs dense bf16 logits (2V B/position); bytes per
               multiple-choice example (L=96, one scored position) vs storing every position;
               the share of the teacher's probability mass inside its top-k on ordinary text
  extraction   tokens/s of teacher forward + top-k over all positions: first_jax's extraction
               program (infer.topk_program) vs transformers' PyTorch
               model + log_softmax + batched torch.topk on the same weights (first_jax's HF
               export loaded by AutoModelForCausalLM)
  postforward  given the logits: first_jax's top-k + tail + packing + a store shard written with
               StoreWriter vs the reference code's full log_softmax + Python loop of {id: value}
               dicts + JSONL
  step         one AdamW step, full-position cross-entropy (step.train_step kind="ce", jitted
               with donation by trainer.compile_step, as training runs it) vs a PyTorch AdamW
               step on the transformers model; MFU of each against the f32 matmul peak
               measured in this run (jnp.dot / torch.mm of [n, n]). Then, timed on its own
               after that comparison, first_jax's offline top-k KD step (LossSpec
               kind="topk_kd", targets teacher_ids / teacher_logprobs / teacher_tail in the
               batch as the store gives them): tokens/s and MFU beside ce (no torch baseline)
  search       the ECE temperature search of the calibrate stage (temperature.search: every
               grid temperature scored in one compiled lax.scan, refine off so the curve is the
               grid) vs a NumPy loop over the temperatures (`numpy_ece_curve`: vectorised over
               the events), 1,000 temperatures x 100k seeded synthetic events (top-5 log-probs +
               tail); the section asserts both give the same ECE curve and best temperature
  loss_memory  top-k KD loss memory at V = 151,936, B*L = 8,192 (--quick: B*L = 1,024):
               losses.topk_kd with a chunked log-normaliser (and fused, as the step calls it) vs
               `naive_topk_kd` (full-vocabulary log_softmax, take_along_axis at the k ids, KL):
               XLA's compiled temporaries (memory_analysis, abstract shapes, as
               bench/math_memory.py) of forward and forward+grad, and the peak RSS
               (ru_maxrss) of a child process running each forward+grad once (the f32 [B*L, V]
               logits input and its gradient are not temporaries; --full's naive child needs
               about 20 GB of RAM)

Headline keys at the top of the JSON: store_bytes_per_token (V=151,936, L=512, P=256),
extraction_speedup_vs_torch, postforward_speedup_vs_reference, step_speedup_vs_torch, step_mfu,
step_kd_mfu, search_speedup_vs_numpy, loss_memory_ratio_vs_naive (chunked / naive compiled
temporaries of forward+grad: lower is better, the issue's target <= 0.25)
(a speedup > 1 means first_jax is faster). The teacher is SmolLM2-135M-Instruct (the project's
`smollm2` asset, dequantised to float32); `--model DIR` takes any HF Llama-family folder instead.
The search and loss_memory sections need no model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from bench.common import Context, environment, INT_OPTIONS, log, MODES, Settings
from bench.sections.store import section_store
from bench.sections.extraction import section_extraction, section_postforward
from bench.sections.step import section_step
from bench.sections.search import section_search
from bench.sections.loss_memory import section_loss_memory

SECTIONS = ("store", "extraction", "postforward", "step", "search", "loss_memory")


SECTION_FNS = {"store": section_store, "extraction": section_extraction,
               "postforward": section_postforward, "step": section_step,
               "search": section_search, "loss_memory": section_loss_memory}


# ----------------------------------------------------------------------------- driver


def run(s: Settings, only: tuple[str, ...] = SECTIONS,
        argv: list[str] | None = None) -> dict[str, Any]:
  t0 = time.perf_counter()
  argv = sys.argv[1:] if argv is None else argv
  result: dict[str, Any] = {
      "benchmark": "first_jax vs PyTorch/transformers and the FIRST reference code (issue 11)",
      "command": " ".join(["python", "-m", "bench.run", *argv]),
      "dtype": s.dtype, "settings": dataclasses.asdict(s), "sections_run": list(only),
      "meta": environment()}
  ctx = Context(s)
  try:
    result["meta"]["torch_threads"] = ctx.cores
    sections: dict[str, Any] = {}
    for name in only:
      ts = time.perf_counter()
      sections[name] = SECTION_FNS[name](ctx, s)
      sections[name]["section_wall_s"] = round(time.perf_counter() - ts, 3)
      log(f"{name}: done in {sections[name]['section_wall_s']:.1f} s")
    if "matmul_peak" in ctx._cache:
      sections["matmul_peak"] = ctx.peak()
    result["sections"] = sections
    result["model"] = ctx.model_info() if "load_first_jax" in ctx._cache else None
    result["text"] = ctx._cache.get("text_source")
    result["setup_s"] = ctx.setup_s
  finally:
    ctx.close()
  sec = result["sections"]
  result["store_bytes_per_token"] = (sec["store"]["headline"]["bytes_per_scored_token"]
                                     if "store" in sec else None)
  result["store_bytes_per_position_sampled"] = (
      sec["store"]["headline"]["sampled_bytes_per_scored_token"] if "store" in sec else None)
  result["extraction_sampled_vs_topk_time"] = sec.get("extraction", {}).get(
      "sampled_vs_topk_time")
  result["extraction_speedup_vs_torch"] = sec.get("extraction", {}).get("speedup_vs_torch")
  result["postforward_speedup_vs_reference"] = sec.get("postforward", {}).get(
      "speedup_vs_reference")
  result["step_speedup_vs_torch"] = sec.get("step", {}).get("speedup_vs_torch")
  result["step_mfu"] = sec.get("step", {}).get("mfu", {}).get("first_jax")
  result["step_kd_mfu"] = sec.get("step", {}).get("mfu", {}).get("first_jax_kd")
  result["search_speedup_vs_numpy"] = sec.get("search", {}).get("speedup_vs_numpy")
  result["loss_memory_ratio_vs_naive"] = sec.get("loss_memory", {}).get(
      "ratio_fwd_grad_chunked_vs_naive")
  result["meta"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  # Another process on the cores: torch's OpenMP barriers then wait for descheduled threads
  # (observed: ~20 ms per parallel region), and every figure of the run is contaminated.
  cores = result["meta"]["cpu"]["cores_available"]
  start = result["meta"]["load_avg_start"]
  result["meta"]["machine_busy_at_start"] = bool(start and start[0] > 0.5 * cores)
  result["meta"]["wall_s"] = round(time.perf_counter() - t0, 3)
  return result


def summary(r: dict[str, Any]) -> str:
  def f(x, fmt):
    return "-" if x is None else format(x, fmt)
  lines = [f"store B/token (V=151,936)     {f(r['store_bytes_per_token'], '.2f')}",
           f"extraction speedup vs torch   {f(r['extraction_speedup_vs_torch'], '.2f')}x",
           f"post-forward vs reference     {f(r['postforward_speedup_vs_reference'], '.1f')}x",
           f"step speedup vs torch         {f(r['step_speedup_vs_torch'], '.2f')}x",
           f"step MFU (first_jax)          {f(r['step_mfu'], '.1%')}",
           f"KD step MFU (first_jax)       {f(r['step_kd_mfu'], '.1%')}",
           f"search speedup vs NumPy       {f(r['search_speedup_vs_numpy'], '.1f')}x",
           f"loss memory vs naive (temps)  {f(r['loss_memory_ratio_vs_naive'], '.3g')}",
           f"wall                          {r['meta']['wall_s']:.0f} s"]
  if r["meta"].get("machine_busy_at_start"):
    lines.append(f"WARNING: load average {r['meta']['load_avg_start'][0]:.1f} on "
                 f"{r['meta']['cpu']['cores_available']} cores at the start: timings contaminated")
  return "\n".join(lines)


def parse(argv: list[str] | None = None) -> tuple[Settings, tuple[str, ...], str | None]:
  ap = argparse.ArgumentParser(prog="python -m bench.run",
                               description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = ap.add_mutually_exclusive_group(required=True)
  mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                    help=f"small shapes, few repetitions (< 10 min on 2 cores): {MODES['quick']}")
  mode.add_argument("--full", action="store_const", const="full", dest="mode",
                    help=f"the issue's shapes, for docs/benchmarks.md: {MODES['full']}")
  ap.add_argument("--out", help="write the JSON here (else it is printed on stdout)")
  ap.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
  ap.add_argument("--model", help="teacher: asset name (smollm2), HF folder or .gguf")
  ap.add_argument("--text", choices=("botchan", "embedded", "random"))
  ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                  help="compute precision of first_jax (params float32) and of the PyTorch "
                       "baselines (bfloat16: torch.autocast); default float32")
  for name in INT_OPTIONS:
    ap.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name,
                    help="override the mode's value")
  ap.add_argument("--no-loss-rss", action="store_true",
                  help="loss_memory: skip the child processes that measure the peak RSS")
  a = ap.parse_args(argv)
  values = dict(MODES[a.mode])
  for name in INT_OPTIONS:
    if getattr(a, name) is not None:
      values[name] = getattr(a, name)
  if a.model:
    values["model"] = a.model
  if a.text:
    values["text"] = a.text
  if a.dtype:
    values["dtype"] = a.dtype
  if a.no_loss_rss:
    values["loss_rss"] = False
  s = Settings(mode=a.mode, **values)
  for name in INT_OPTIONS:
    if name != "warmup" and getattr(s, name) < 1:
      ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(s, name)}")
  if s.loss_vocab < s.k:
    ap.error(f"--loss-vocab: expected >= k = {s.k}, got {s.loss_vocab}")
  if s.warmup < 1:  # the first call compiles: never timed
    ap.error(f"--warmup: expected >= 1, got {s.warmup}")
  only = SECTIONS
  if a.only:
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = [x for x in only if x not in SECTIONS]
    if bad or not only:
      ap.error(f"--only: unknown section(s) {bad} (expected some of {','.join(SECTIONS)})")
  return s, only, a.out


def main(argv: list[str] | None = None) -> int:
  s, only, out = parse(argv)
  result = run(s, only, argv)
  text = json.dumps(result, indent=1, sort_keys=False)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")
    log(f"wrote {out}")
  else:
    print(text)
  print(summary(result), file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
