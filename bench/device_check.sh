#!/usr/bin/env bash
# One accelerator, one command (issue 23, item 5): bench.run's sections at bfloat16 against
# PyTorch on the same device (torch.autocast), then the smoke pipeline on it, into one JSON.
#
#   bench/device_check.sh OUT                       # on a GPU machine (jax[cuda12], torch+CUDA)
#   BENCH_TORCH_DEVICE=cpu BENCH_ARGS="--batch 2 --length 16 ..." bench/device_check.sh OUT
#                                                   # the CPU dry run (tests/test_bench.py, slow)
#
# Budget: under 8 minutes on one H100 with the default --quick shapes. Writes
# OUT/bench_bf16.json (bench.run), OUT/smoke/ (the pipeline's workdir) and
# OUT/device_check.json (bench.device_check: device, versions, ratios, tokens/s, MFU against
# the measured and the spec-sheet peak).
set -euo pipefail
OUT=${1:?usage: bench/device_check.sh OUT}
mkdir -p "$OUT"
export BENCH_TORCH_DEVICE=${BENCH_TORCH_DEVICE:-cuda}
PY=${PYTHON:-python}
# shellcheck disable=SC2086  # BENCH_ARGS / SMOKE_ARGS are word lists on purpose
$PY -m bench.run --quick --dtype bfloat16 ${BENCH_ARGS:-} --out "$OUT/bench_bf16.json"
# shellcheck disable=SC2086
$PY -m first_jax.pipeline --config configs/smoke.py --config.workdir="$OUT/smoke" \
    --config.teacher.model.dtype=bfloat16 --config.student.model.dtype=bfloat16 ${SMOKE_ARGS:-}
$PY -m bench.device_check --bench "$OUT/bench_bf16.json" --smoke "$OUT/smoke" \
    --out "$OUT/device_check.json"
