"""XLA compiler options for the programs that gain from them (`jax.jit(compiler_options=)`).

jaxlib 0.10's XLA:CPU hands every matmul, alone, and every reduction to YNNPACK library calls.
Two kinds of program run faster when YNNPACK instead takes each matmul together with the
elementwise work around it and XLA's own loops do the reductions ("dot" fusions), measured on
2 cores (docs/benchmarks.md, "XLA:CPU's YNNPACK fusions, applied per program"):
  - the train step (SmolLM2-135M, [8, 128]): 11.0 -> 9.5 s in one interleaved run; the layout
    copies that transposed the MLP's backward products inside the layer scan are gone;
  - the temperature search over [N, k + 1] events: 1.30x -> 2.01x NumPy (short reductions).
Not for forward-only programs over the vocabulary (extraction, scoring): there XLA's loops
materialise the V-wide exp of the log-sum-exp (641.8 MB of temporaries for the top-k KD
loss's forward at B*L = 1,024, V = 151,936, against 0.09 MB); under a gradient, as in the
train step, they do not (19.6 MB; tests/test_losses.py holds it under its bound).
"""
from __future__ import annotations

FUSED_DOTS_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def fused_dots(platform: str, dtype: str = "float32") -> dict[str, str] | None:
  """The options above for a program on `platform` ("cpu", "gpu", "tpu") whose matmuls run in
  `dtype`; None elsewhere. Only float32 programs take them: YNNPACK's dot fusions run a bfloat16
  matmul at float32 speed (183 vs 1,218 GFLOP/s for [1024,576]x[576,1536] with float32
  accumulation, issue 23), so a bfloat16 program keeps XLA's default library calls."""
  return dict(FUSED_DOTS_CPU) if platform == "cpu" and dtype == "float32" else None
