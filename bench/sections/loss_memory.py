"""bench/run.py's loss_memory section: the top-k KD loss's memory at a large vocabulary against a
naive full-vocabulary KD."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from bench.common import check, Context, log, ratio, ROOT, Settings


def naive_topk_kd(logits_NxV, ids_NxK, logprobs_NxK, tail_N, mask_N):
  """The baseline: the same loss as losses.topk_kd (forward KL, tail bucket) written the plain
  way: log_softmax over the full vocabulary, take_along_axis at the k teacher ids, KL over the
  k + 1 bins. Returns (loss_sum, weight_sum)."""
  import jax
  import jax.numpy as jnp
  s_lp_NxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1)
  q_NxK = jnp.take_along_axis(s_lp_NxV, ids_NxK, axis=-1)
  q_tail_N = jnp.log1p(-jnp.sum(jnp.exp(q_NxK), axis=-1))
  p_NxB = jnp.concatenate([logprobs_NxK, tail_N[:, None]], -1)
  q_NxB = jnp.concatenate([q_NxK, q_tail_N[:, None]], -1)
  kl_N = jnp.sum(jnp.exp(p_NxB) * (p_NxB - q_NxB), axis=-1)
  return jnp.sum(kl_N * mask_N), jnp.sum(mask_N)


def _loss_variants(chunk: int) -> dict[str, Callable]:
  """(logits [N, V], ids [N, K], logprobs [N, K], tail [N], mask [N]) -> (sum, count)."""
  from first_jax.core import losses

  def first_jax(vocab_chunk):
    return lambda x, ids, lp, tail, m: losses.topk_kd(
        x, ids, lp, m, tail="bucket", teacher_tail_logmass_BxL=tail, vocab_chunk=vocab_chunk)
  return {"chunked": first_jax(chunk), "fused": first_jax(None), "naive": naive_topk_kd}


def _loss_programs(fn: Callable) -> dict[str, Callable]:
  import jax
  return {"forward": fn,
          "forward_grad": jax.value_and_grad(lambda x, *a: fn(x, *a)[0])}


def _loss_shapes(n: int, v: int, k: int) -> tuple:
  import jax
  import jax.numpy as jnp
  sds = jax.ShapeDtypeStruct
  return (sds((n, v), jnp.float32), sds((n, k), jnp.int32), sds((n, k), jnp.float32),
          sds((n,), jnp.float32), sds((n,), jnp.float32))


def _loss_inputs(n: int, v: int, k: int):
  """Deterministic loss inputs made on the device (the logits by one fused elementwise program:
  no temporaries of their own)."""
  import jax
  import jax.numpy as jnp
  logits = jax.jit(lambda: 4.0 * jnp.sin(
      0.37 * jax.lax.broadcasted_iota(jnp.float32, (n, v), 1)
      + 1.3 * jax.lax.broadcasted_iota(jnp.float32, (n, v), 0)))()
  row = np.arange(n)[:, None]
  ids = ((row * 131 + np.arange(k) * max(1, v // k)) % v).astype(np.int32)
  p = np.linspace(0.5, 0.05, k)
  p = p / p.sum() * 0.9
  lp = np.broadcast_to(np.log(p).astype(np.float32), (n, k)).copy()
  tail = np.full((n,), np.log(0.1), np.float32)
  return jax.block_until_ready((logits, *jax.device_put((ids, lp, tail,
                                                          np.ones((n,), np.float32)))))


def loss_rss_child(arg: str) -> None:
  """Child process of the loss_memory section: compile one loss's forward+grad, make its inputs,
  run it once, print the resident-set figures (bytes) as one JSON line."""
  import resource
  import jax
  a = json.loads(arg)
  fn = _loss_programs(_loss_variants(a["chunk"])[a["variant"]])["forward_grad"]
  compiled = jax.jit(fn).lower(*_loss_shapes(a["n"], a["v"], a["k"])).compile()
  maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  after_compile = maxrss()
  inputs = _loss_inputs(a["n"], a["v"], a["k"])
  with open("/proc/self/statm") as f:
    rss_now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  before = maxrss()
  jax.block_until_ready(compiled(*inputs))
  after = maxrss()
  with open("/proc/self/status") as f:  # the kernel's own peak of this process, as a check
    hwm = [int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")]
  print(json.dumps({"maxrss_after_compile": after_compile, "maxrss_with_inputs": before,
                    "rss_before_run": rss_now, "maxrss_after_run": after,
                    "vmhwm_after_run": hwm[0] if hwm else None}))


def _run_loss_child(variant: str, n: int, v: int, k: int, chunk: int) -> dict[str, Any]:
  arg = json.dumps({"variant": variant, "n": n, "v": v, "k": k, "chunk": chunk})
  # Through a shell that forks (not execs) Python: on Linux ru_maxrss survives execve, so a
  # child exec'd straight from this (large) process would report this process's peak.
  cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c",
         "import sys, bench.sections.loss_memory as r; r.loss_rss_child(sys.argv[1])", arg]
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  except subprocess.TimeoutExpired:
    return {"error": "timed out after 1800 s"}
  wall = round(time.perf_counter() - t0, 3)
  if p.returncode != 0:  # e.g. killed for memory: reported, the section goes on
    return {"error": f"exit status {p.returncode}: {p.stderr.strip()[-600:]}", "wall_s": wall}
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out["run_peak_above_rss_before_run"] = out["maxrss_after_run"] - out["rss_before_run"]
  out["wall_s"] = wall
  return out


def section_loss_memory(ctx: Context, s: Settings) -> dict[str, Any]:
  import jax
  from bench import math_memory
  n, v, k, chunk = s.loss_positions, s.loss_vocab, s.k, s.loss_vocab_chunk
  variants = _loss_variants(chunk)
  shapes = _loss_shapes(n, v, k)
  log(f"loss_memory: [{n}, {v}] f32 logits, k={k}, chunk {chunk}: compiled temporaries")
  temp: dict[str, dict[str, int]] = {}
  for name, fn in variants.items():
    temp[name] = {p: int(round(math_memory.temps(prog, *shapes) * 1e6))  # temps() gives MB
                  for p, prog in _loss_programs(fn).items()}
  # same loss: the values and gradients of chunked and naive agree (a few rows, the same V)
  rows = min(n, 8)
  small = _loss_inputs(rows, v, k)
  got = {name: jax.device_get(jax.jit(_loss_programs(variants[name])["forward_grad"])(*small))
         for name in ("chunked", "naive")}
  (lc, grad_c), (ln, grad_n) = got["chunked"], got["naive"]
  agree = {"rows": rows, "loss": {"chunked": float(lc), "naive": float(ln)},
           "max_abs_grad_diff": float(np.abs(grad_c - grad_n).max())}
  check(np.allclose(lc, ln, rtol=1e-4, atol=1e-5), f"loss_memory: losses differ {agree}")
  check(np.allclose(grad_c, grad_n, rtol=1e-4, atol=1e-6),
        f"loss_memory: gradients differ {agree}")
  del small, got
  logits_bytes = n * v * 4
  out: dict[str, Any] = {
      "shapes": {"logits": [n, v], "teacher_topk": [n, k], "B*L": n, "vocab_chunk": chunk},
      "positions_note": ("B*L = 8,192 as the issue asks" if n == 8192 else
                         f"B*L = {n}, not the issue's 8,192 ({s.mode} mode or --loss-positions)"),
      "what": {"chunked": f"losses.topk_kd(tail='bucket', vocab_chunk={chunk}): online "
                          "log-sum-exp over vocab chunks, gather at the k ids",
               "fused": "losses.topk_kd(tail='bucket', vocab_chunk=None), as step.kd_loss_parts "
                        "calls it: one fused log-sum-exp pass",
               "naive": "bench.run.naive_topk_kd: jax.nn.log_softmax over V, take_along_axis "
                        "at the k ids, KL over k + 1 bins (same value, asserted)"},
      "how": "jax.jit(fn).lower(abstract shapes).compile().memory_analysis()"
             ".temp_size_in_bytes (bench.math_memory.temps); forward = the loss, forward_grad "
             "= jax.value_and_grad over the logits (the [B*L, V] gradient is an output)",
      "backend": jax.default_backend(),
      "logits_input_bytes": logits_bytes,
      "temp_bytes": temp,
      "temp_in_logits_copies": {nm: {p: x / logits_bytes for p, x in d.items()}
                                for nm, d in temp.items()},
      "ratio_vs_naive": {nm: {p: ratio(d[p], temp["naive"][p]) for p in d}
                         for nm, d in temp.items() if nm != "naive"},
      "agreement": agree}
  if s.loss_rss:
    log(f"loss_memory: peak RSS of a child process per loss (forward+grad, [{n}, {v}])")
    out["peak_rss_bytes"] = {nm: _run_loss_child(nm, n, v, k, chunk)
                             for nm in ("chunked", "naive")}
    out["peak_rss_how"] = (
        "one child process per loss (python -c bench.run.loss_rss_child): compile its "
        "forward+grad, make the inputs, run once; ru_maxrss (RUSAGE_SELF) after compiling, with "
        "the inputs made, after the run (VmHWM of /proc/self/status as a check); "
        "run_peak_above_rss_before_run = ru_maxrss after the run - the resident set just "
        "before it. Launched through /bin/sh (fork, then exec) so that ru_maxrss is the "
        "child's own, not inherited from this process across execve")
  out["ratio_fwd_grad_chunked_vs_naive"] = out["ratio_vs_naive"]["chunked"]["forward_grad"]
  return out
