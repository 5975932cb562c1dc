#!/usr/bin/env bash
#SBATCH --job-name=first_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#
# Runs one first_jax stage on a Slurm GPU cluster: ONE process per node, each seeing all of its
# node's GPUs; jax detects the job from Slurm (first_jax.runtime.distributed passes all the node's GPUs,
# from CUDA_VISIBLE_DEVICES, instead of jax's one-GPU-per-task default).
#
# Once, on a login node, in the checkout on the shared filesystem (Python >= 3.11):
#   python3.11 -m venv .venv && .venv/bin/pip install -e '.[cuda]'
# Then (edit the #SBATCH lines, or override them on the command line):
#   STAGE=train CONFIG=configs/smoke.py sbatch --nodes=4 launch/gpu_slurm.sh \
#     --config.workdir=/shared/runs/r1 --config.mesh.data=-1 --config.mesh.fsdp=8
# Arguments after the script name go to the stage (config overrides). The workdir must be on a
# filesystem every node sees.
set -euo pipefail

STAGE="${STAGE:-pipeline}"            # finetune | extract | calibrate | train | evaluate | pipeline
CONFIG="${CONFIG:-configs/smoke.py}"
PYTHON="${PYTHON:-.venv/bin/python}"  # relative to the submit directory
LOCAL_DEVICE_IDS="${LOCAL_DEVICE_IDS:-}"  # e.g. 0,1,2,3 if the cluster leaves CUDA_VISIBLE_DEVICES unset
# Overlap collectives with compute (a documented XLA GPU flag); replace via XLA_FLAGS if needed.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"

case "$STAGE" in
  finetune|extract|calibrate|train|evaluate|pipeline) ;;
  *) echo "STAGE: expected finetune|extract|calibrate|train|evaluate|pipeline, got $STAGE" >&2
     exit 2 ;;
esac

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -n "$LOCAL_DEVICE_IDS" ]]; then export JAX_LOCAL_DEVICE_IDS="$LOCAL_DEVICE_IDS"; fi

srun_flags=(--ntasks-per-node=1 --kill-on-bad-exit=1)
# Newer Slurm no longer hands --cpus-per-task from sbatch to srun on its own.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then srun_flags+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

echo "job ${SLURM_JOB_ID:-?}: ${SLURM_JOB_NUM_NODES:-?} node(s), first_jax.$STAGE --config $CONFIG $*" >&2
srun "${srun_flags[@]}" "$PYTHON" -m "first_jax.$STAGE" --config "$CONFIG" "$@"
