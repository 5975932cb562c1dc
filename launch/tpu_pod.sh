#!/usr/bin/env bash
# Runs one first_jax stage on every worker of a Cloud TPU VM (pod slice or single host): one
# process per host, all started together; jax detects the pod (FIRST_JAX_DISTRIBUTED=on).
#
# Usage (from the repository root, with gcloud logged in and a TPU VM already created):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/smoke.py STAGE=pipeline \
#     launch/tpu_pod.sh --config.workdir=/mnt/shared/run1 \
#       --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=4
#
# Arguments after the script name go to the stage unchanged (config overrides).
# Code: REPO empty (default) copies THIS checkout (tracked + untracked, not ignored files) to
# every worker; REPO=<git url> clones it at REF instead. SETUP=0 skips the venv + pip install on
# later runs. The workdir must be shared by all workers (NFS / Filestore / gcsfuse mount): the
# store's per-host shards are merged by host 0 and checkpoints are written by all hosts.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
ZONE="${ZONE:?set ZONE (e.g. us-central2-b)}"
PROJECT="${PROJECT:-}"                  # empty: gcloud's default project
STAGE="${STAGE:-pipeline}"              # finetune | extract | calibrate | train | evaluate | pipeline
CONFIG="${CONFIG:-configs/smoke.py}"    # relative to the checkout on the workers
REPO="${REPO:-}"                        # git URL; empty: copy this checkout
REF="${REF:-main}"                      # branch / tag / commit when REPO is set
REMOTE_DIR="${REMOTE_DIR:-first_jax}"   # checkout folder on each worker, under $HOME
VENV="${VENV:-first_jax_venv}"          # virtual environment on each worker, under $HOME
SETUP="${SETUP:-1}"                     # 1: create the venv and pip install -e '.[tpu]'
PYTHON="${PYTHON:-python3}"             # on the workers; first_jax needs Python >= 3.11
EXTRA_ENV="${EXTRA_ENV:-}"              # e.g. "LIBTPU_INIT_ARGS=... FIRST_JAX_INIT_TIMEOUT=600"

case "$STAGE" in
  finetune|extract|calibrate|train|evaluate|pipeline) ;;
  *) echo "STAGE: expected finetune|extract|calibrate|train|evaluate|pipeline, got $STAGE" >&2
     exit 2 ;;
esac

gcloud_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then gcloud_flags+=(--project="$PROJECT"); fi

if [[ -z "$REPO" ]]; then
  # Ship the working tree as one tarball (what git would commit now, without ignored outputs).
  tarball="$(mktemp "${TMPDIR:-/tmp}/first_jax_src.XXXXXX")"
  trap 'rm -f "$tarball"' EXIT
  git ls-files -z --cached --others --exclude-standard \
    | tar czf "$tarball" --null --ignore-failed-read -T -
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:first_jax_src.tgz" \
    --worker=all "${gcloud_flags[@]}"
  fetch="mkdir -p ~/$(printf %q "$REMOTE_DIR") && tar xzf ~/first_jax_src.tgz -C ~/$(printf %q "$REMOTE_DIR")"
else
  fetch="if [ ! -d ~/$(printf %q "$REMOTE_DIR")/.git ]; then \
git clone $(printf %q "$REPO") ~/$(printf %q "$REMOTE_DIR"); fi && \
git -C ~/$(printf %q "$REMOTE_DIR") fetch --depth 1 origin $(printf %q "$REF") && \
git -C ~/$(printf %q "$REMOTE_DIR") checkout --force FETCH_HEAD"
fi

setup=":"
if [[ "$SETUP" == "1" ]]; then
  setup="$(printf %q "$PYTHON") -m venv ~/$(printf %q "$VENV") && \
~/$(printf %q "$VENV")/bin/pip install --quiet --upgrade pip && \
~/$(printf %q "$VENV")/bin/pip install --quiet -e '.[tpu]'"
fi

stage_args=""
if (($#)); then stage_args="$(printf ' %q' "$@")"; fi

remote="set -euo pipefail; $fetch; cd ~/$(printf %q "$REMOTE_DIR"); $setup; \
export FIRST_JAX_DISTRIBUTED=on $EXTRA_ENV; \
exec ~/$(printf %q "$VENV")/bin/python -m first_jax.$STAGE --config $(printf %q "$CONFIG")$stage_args"

echo "running on all workers of $TPU_NAME: first_jax.$STAGE --config $CONFIG$stage_args" >&2
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_flags[@]}" \
  --command="bash -c $(printf %q "$remote")"
