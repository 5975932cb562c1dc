"""Compiled temporary memory and run time of the math core at LLM vocabulary size.

    python bench/math_memory.py [--B 2 --L 512 --V 151936 --k 5] [--time]

Compiles with abstract shapes only (nothing of size B*L*V is allocated unless --time) and prints
XLA's `memory_analysis()` temporaries for extract, topk_kd forward (fused and chunked) and its
gradient, in f32 and bf16. The figures in docs/math.md come from this script on the CPU.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from first_jax.core import losses, topk


def temps(fn, *shapes) -> float:
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes / 1e6


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--B", type=int, default=2)
  ap.add_argument("--L", type=int, default=512)
  ap.add_argument("--V", type=int, default=151936)
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--time", action="store_true", help="also time f32 runs (allocates B*L*V)")
  a = ap.parse_args()
  b, l, v, k = a.B, a.L, a.V, a.k
  print(f"backend {jax.default_backend()}; B={b} L={l} V={v} k={k}; one f32 [B,L,V] = "
        f"{b * l * v * 4 / 1e6:.1f} MB")
  print("| compiled temporaries (MB) | f32 | bf16 |\n|---|---|---|")
  ids = jax.ShapeDtypeStruct((b, l, k), jnp.int32)
  lp = jax.ShapeDtypeStruct((b, l, k), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, l), jnp.float32)
  rows = {
      "extract": lambda x: temps(functools.partial(topk.extract, k=k), x),
      "topk_kd forward": lambda x: temps(losses.topk_kd, x, ids, lp, mask),
      "topk_kd forward, vocab_chunk=8192": lambda x: temps(
          functools.partial(losses.topk_kd, vocab_chunk=8192), x, ids, lp, mask),
      "topk_kd gradient (beyond the gradient itself)": lambda x: temps(
          jax.grad(lambda *z: losses.topk_kd(*z)[0]), x, ids, lp, mask),
  }
  for name, fn in rows.items():
    vals = [fn(jax.ShapeDtypeStruct((b, l, v), d)) for d in (jnp.float32, jnp.bfloat16)]
    print(f"| {name} | {vals[0]:.2f} | {vals[1]:.2f} |")
  if a.time:
    key = jax.random.key(0)
    logits = jax.random.normal(key, (b, l, v), jnp.float32)
    t_ids = jax.random.randint(key, (b, l, k), 0, v)
    t_lp = jax.nn.log_softmax(jax.random.normal(key, (b, l, k)))
    m = jnp.ones((b, l))
    for name, fn, args in (
        ("extract", jax.jit(functools.partial(topk.extract, k=k)), (logits,)),
        ("topk_kd forward", jax.jit(losses.topk_kd), (logits, t_ids, t_lp, m)),
        ("topk_kd fwd+bwd", jax.jit(jax.grad(lambda *z: losses.topk_kd(*z)[0])),
         (logits, t_ids, t_lp, m))):
      jax.block_until_ready(fn(*args))
      t0 = time.perf_counter()
      for _ in range(3):
        jax.block_until_ready(fn(*args))
      print(f"{name}: {(time.perf_counter() - t0) / 3:.3f} s")


if __name__ == "__main__":
  main()
