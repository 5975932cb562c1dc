#!/usr/bin/env bash
# The trust study (configs/trust.py), one student seed at a time; after each seed its record is
# collected into docs/results/results_seed<N>.json and docs/results.md + docs/results/summary.json
# are rebuilt from every seed record committed so far.
#   bash bench/run_trust.sh [SEED ...]          (default: 0)
# Seed 0's workdir holds the split, the fine-tuned teacher, the top-k store and the teachers'
# cached evaluation scores; other seeds hard-link them in (the pipeline checks their
# fingerprints and redoes whatever differs). Extra pipeline flags: TRUST_FLAGS="--config.x=y".
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ $# -eq 0 ] && seeds=(0)
src=workdir/trust/seed0
for s in "${seeds[@]}"; do
  wd="workdir/trust/seed$s"
  if [ "$s" != 0 ]; then
    for stage in finetune extract calibrate; do  # the shared teacher (done stages are skipped)
      # shellcheck disable=SC2086
      python -m first_jax.$stage --config "configs/trust.py:seed=0" ${TRUST_FLAGS:-}
    done
    mkdir -p "$wd/eval/scores"
    for part in data teacher store; do
      [ -e "$wd/$part" ] || cp -al "$src/$part" "$wd/$part"
    done
    for name in teacher teacher_pretrained; do
      f="$src/eval/scores/$name.npz"
      [ -e "$f" ] && [ ! -e "$wd/eval/scores/$name.npz" ] && ln "$f" "$wd/eval/scores/$name.npz"
    done
  fi
  # shellcheck disable=SC2086
  python -m first_jax.pipeline --config "configs/trust.py:seed=$s" ${TRUST_FLAGS:-}
  python bench/report.py --runs "$wd" --out docs --name results \
    --summary docs/results/summary.json --config-name configs/trust.py \
    --title "trust study: FIRST with an over-confident teacher"
done
