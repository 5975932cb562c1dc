#!/usr/bin/env bash
# configs/demo_long.py (students trained 5 epochs instead of 2) for each seed, then its report
# in docs/results_long.md. A seed's fine-tuned teacher, split and store are those of
# demo_full (the same fingerprint): when workdir/demo_full/seed<N> has them they are hard-linked
# in rather than recomputed (the pipeline checks the fingerprints and re-runs what differs).
#   bash bench/run_demo_long.sh [SEED ...]          (default: 0 1 2)
# Extra pipeline flags: DEMO_LONG_FLAGS="--config.students=('sft','first','kd')" bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ $# -eq 0 ] && seeds=(0 1 2)
runs=()
for s in "${seeds[@]}"; do
  wd="workdir/demo_long/seed$s"
  src="workdir/demo_full/seed$s"
  mkdir -p "$wd"
  for part in data teacher store; do
    if [ -d "$src/$part" ] && [ ! -e "$wd/$part" ]; then cp -al "$src/$part" "$wd/$part"; fi
  done
  # shellcheck disable=SC2086
  python -m first_jax.pipeline --config "configs/demo_long.py:seed=$s" ${DEMO_LONG_FLAGS:-}
  runs+=("$wd")
done
python bench/report.py --runs "${runs[@]}" --out docs --name results_long \
  --config-name configs/demo_long.py \
  --title "demo_long: students trained 5 epochs (${#runs[@]} seeds)"
