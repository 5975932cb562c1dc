#!/usr/bin/env bash
# Runs one first_jax stage on this machine: ONE process that sees all local GPUs (or the ones in
# GPUS), so no jax.distributed set-up is needed.
#
# Once (Python >= 3.11):  python3.11 -m venv .venv && .venv/bin/pip install -e '.[cuda]'
# Usage:
#   STAGE=pipeline CONFIG=configs/smoke.py launch/gpu_local.sh --config.mesh.fsdp=-1 --config.mesh.data=1
#   GPUS=0,1 STAGE=train launch/gpu_local.sh ...   # only GPUs 0 and 1
# Arguments after the script name go to the stage (config overrides).
set -euo pipefail

STAGE="${STAGE:-pipeline}"            # finetune | extract | calibrate | train | evaluate | pipeline
CONFIG="${CONFIG:-configs/smoke.py}"
PYTHON="${PYTHON:-.venv/bin/python}"
GPUS="${GPUS:-}"                      # empty: all GPUs of the machine
# Overlap collectives with compute (a documented XLA GPU flag); replace via XLA_FLAGS if needed.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"

case "$STAGE" in
  finetune|extract|calibrate|train|evaluate|pipeline) ;;
  *) echo "STAGE: expected finetune|extract|calibrate|train|evaluate|pipeline, got $STAGE" >&2
     exit 2 ;;
esac

cd "$(dirname "$0")/.."
if [[ -n "$GPUS" ]]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
# One process: never wait for other processes, even inside a Slurm allocation.
export FIRST_JAX_DISTRIBUTED=off
exec "$PYTHON" -m "first_jax.$STAGE" --config "$CONFIG" "$@"
