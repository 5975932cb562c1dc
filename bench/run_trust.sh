#!/usr/bin/env bash
# The trust study (configs/trust.py), one student seed at a time; after each seed its record is
# collected into docs/results/results_seed<N>.json and docs/results.md + docs/results/summary.json
# are rebuilt from every seed record committed so far.
#   bash bench/run_trust.sh teacher      fine-tune the shared teacher (seed 0's workdir), extract
#                                        and calibrate its store, and refresh docs/results/teacher/
#   bash bench/run_trust.sh SEED ...     student seeds (0: the full pipeline, teacher rows included)
#
# Every student seed shares one teacher. What the students need of it is small and committed:
# docs/results/teacher/ holds the calibrated top-k store (about 0.2 MB) and the pretrained
# teacher's cached evaluation scores (added by the first seed that computes them), so a fresh
# machine restores them instead of fine-tuning the teacher again (~90 minutes on 2 cores). Seeds
# >= 1 then run `train` and `evaluate` only, so their reports have no fine-tuned-teacher row (its
# scores do not depend on the student seed: seed 0 reports it).
# TRUST_FROM_BUNDLE=1 runs seed 0 as the others (bundle restored, no fine-tuned-teacher row).
# Extra stage flags: TRUST_FLAGS="--config.x=y".
# The study: TRUST_STUDY unset is the first one (configs/trust.py, multiemo: docs/results.md,
# docs/results/summary.json, docs/results/teacher/); TRUST_STUDY=vader or evals runs
# configs/trust_<study>.py into docs/results_<study>.md, docs/results/<study>/summary.json and
# docs/results/<study>/teacher/ (issue 25).
set -euo pipefail
cd "$(dirname "$0")/.."
study=${TRUST_STUDY:-}
if [ -z "$study" ]; then
  config=configs/trust.py name=results bundle=docs/results/teacher
  summary=docs/results/summary.json wd_root=workdir/trust
  title="trust study: FIRST with an over-confident teacher"
else
  config=configs/trust_$study.py name=results_$study bundle=docs/results/$study/teacher
  summary=docs/results/$study/summary.json wd_root=workdir/trust_$study
  title="trust study on $study: FIRST with an over-confident teacher"
fi
[ -f "$config" ] || { echo "TRUST_STUDY=$study: no $config" >&2; exit 2; }
teacher_wd=$wd_root/seed0

run_stage() {  # stage seed: runs one stage (it records its seconds in the workdir's timings.json)
  # shellcheck disable=SC2086
  python -m "first_jax.$1" --config "$config:seed=$2" ${TRUST_FLAGS:-}
}

report() {  # wd: collects the seed's record and rebuilds the aggregate report
  mkdir -p "$(dirname "$summary")"
  python bench/report.py --runs "$1" --out docs --name "$name" \
    --summary "$summary" --config-name "$config" --title "$title"
}

for s in "${@:-0}"; do
  if [ "$s" = teacher ]; then
    for stage in finetune extract calibrate; do run_stage "$stage" 0; done
    rm -rf "$bundle.tmp" && mkdir -p "$bundle.tmp"
    cp -r "$teacher_wd/store" "$bundle.tmp/store"
    rm -f "$bundle.tmp/store/"*.png  # figures: the report copies seed 0's
    rm -rf "$bundle" && mv "$bundle.tmp" "$bundle"
    continue
  fi
  wd="$wd_root/seed$s"
  if [ "$s" = 0 ] && [ -z "${TRUST_FROM_BUNDLE:-}" ]; then
    # shellcheck disable=SC2086
    python -m first_jax.pipeline --config "$config:seed=0" ${TRUST_FLAGS:-}
  else
    mkdir -p "$wd/eval/scores"
    [ -e "$wd/store" ] || cp -r "$bundle/store" "$wd/store"
    cached="$bundle/teacher_pretrained.npz"  # its scores: the same for every seed
    f="$wd/eval/scores/teacher_pretrained.npz"
    [ -e "$f" ] || [ ! -e "$cached" ] || cp "$cached" "$f"
    run_stage train "$s"
    run_stage evaluate "$s"
    if [ ! -e "$cached" ]; then cp "$f" "$cached.tmp" && mv "$cached.tmp" "$cached"; fi
  fi
  report "$wd"
done
