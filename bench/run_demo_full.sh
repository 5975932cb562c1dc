#!/usr/bin/env bash
# The demo_full experiment: the pipeline for each seed, then the report in docs/results_demo_full.md.
#   bash bench/run_demo_full.sh [SEED ...]          (default: 0 1 2)
# WORKDIR_<seed> overrides a seed's workdir (default workdir/demo_full/seed<seed>).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("${@:-0 1 2}")
[ $# -eq 0 ] && seeds=(0 1 2)
runs=()
for s in "${seeds[@]}"; do
  var="WORKDIR_$s"
  wd="${!var:-workdir/demo_full/seed$s}"
  python -m first_jax.pipeline --config "configs/demo_full.py:seed=$s" --config.workdir="$wd"
  runs+=("$wd")
done
python bench/report.py --runs "${runs[@]}" --out docs --name results_demo_full \
  --config-name configs/demo_full.py --title "demo_full (${#runs[@]} seeds)"
