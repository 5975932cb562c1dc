#!/usr/bin/env bash
# N processes of one command on this machine, joined into one multi-process JAX job over CPU
# devices (what a TPU pod or a Slurm GPU job does across hosts), for trying multi-host code
# without a cluster:
#   bash launch/local_multiprocess.sh 2 python -m first_jax.pipeline --config configs/smoke.py \
#       --config.workdir=workdir/smoke_2proc
# Each process gets FIRST_JAX_COORDINATOR / FIRST_JAX_NUM_PROCESSES / FIRST_JAX_PROCESS_ID (see
# first_jax/runtime/distributed.py and docs/launch.md) and LOCAL_DEVICES fake CPU devices (default 4).
# Process 0 prints to the terminal; every process logs to $LOG_DIR/process-<i>.log (default
# workdir/multiprocess-logs). The first process to fail stops the others; the exit status is
# the first failure's (0 when all succeed).
set -uo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-workdir/multiprocess-logs}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  (
    export FIRST_JAX_COORDINATOR="localhost:$port" FIRST_JAX_NUM_PROCESSES="$n"
    export FIRST_JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES:-4}"
    if [ "$i" = 0 ]; then
      exec "$@" > >(tee "$log_dir/process-$i.log") 2>&1
    else
      exec "$@" > "$log_dir/process-$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done
status=0
remaining=$n
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid; rc=$?
  remaining=$((remaining - 1))
  if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
    status=$rc
    echo "$0: a process (pid $done_pid) exited with $rc; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null
  fi
done
exit "$status"
