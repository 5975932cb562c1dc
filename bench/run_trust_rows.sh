#!/usr/bin/env bash
# Rows added to a committed trust study (issue 26: kd-sampled, first-sampled, full_kd), one
# student seed at a time, without re-training the rows already committed:
#   TRUST_STUDY=vader bash bench/run_trust_rows.sh SEED ...
#   TRUST_ROWS=kd-sampled,first-sampled,full_kd (default) picks the students.
#   TRUST_TEACHER_RUN=workdir/trust_<study>/seed0 uses a workdir that still holds the study's
#   fine-tuned teacher instead of fine-tuning it again (the same store check applies).
#
# These rows need the fine-tuned teacher itself (the sample stage draws from it; full_kd runs it
# inside the step), which the study's bundle does not hold (weights stay out of git). So the
# first seed fine-tunes it again, in workdir/trust_<study>_rows/teacher_run (the study's recipe,
# seed 0: the same config as the committed one), and checks that it IS the committed teacher:
# its top-k store, extracted again, must be byte for byte the bundle's (docs/results/<study>/
# teacher/store; the line "teacher: N of N store shards identical" or a stop). Each seed's
# workdir workdir/trust_<study>_rows/seed<N> then restores the bundle store (with its
# calibration) and the pre-trained teacher's cached scores, links the teacher, and runs the
# pipeline for TRUST_ROWS only (sample, train, evaluate); `bench/report.py --add-rows` adds the
# new models to docs/results/results_<study>_seed<N>.json after checking that the models both
# evaluated (the pre-trained and the fine-tuned teacher) have the same per-example events, and
# rebuilds the report.
set -euo pipefail
cd "$(dirname "$0")/.."
study=${TRUST_STUDY:?set TRUST_STUDY (vader or evals)}
rows=${TRUST_ROWS:-kd-sampled,first-sampled,full_kd}
config=configs/trust_$study.py name=results_$study bundle=docs/results/$study/teacher
summary=docs/results/$study/summary.json root=workdir/trust_${study}_rows
title="trust study on $study: FIRST with an over-confident teacher"
[ -f "$config" ] || { echo "TRUST_STUDY=$study: no $config" >&2; exit 2; }
teacher_run=${TRUST_TEACHER_RUN:-$root/teacher_run}

stage() {  # stage workdir seed [flags...]
  local s=$1 wd=$2 seed=$3
  shift 3
  python -m "first_jax.$s" --config "$config:seed=$seed" "--config.workdir=$wd" "$@"
}

if [ ! -e "$teacher_run/teacher/done.json" ] || [ ! -e "$teacher_run/reproduced" ]; then
  stage finetune "$teacher_run" 0
  stage extract "$teacher_run" 0
  python - "$teacher_run/store" "$bundle/store" <<'EOF'
import json, sys
new, old = (json.load(open(f"{d}/manifest.json")) for d in sys.argv[1:3])
same = [a["sha256"] == b["sha256"] for a, b in zip(new["shards"], old["shards"])]
if len(new["shards"]) != len(old["shards"]) or not all(same):
  sys.exit(f"teacher NOT reproduced: {sum(same)} of {len(old['shards'])} store shards identical "
           f"to {sys.argv[2]}; the added rows would distil another teacher")
print(f"teacher: {len(same)} of {len(same)} store shards identical to {sys.argv[2]}")
EOF
  touch "$teacher_run/reproduced"
fi

for s in "$@"; do
  wd=$root/seed$s
  mkdir -p "$wd/eval/scores"
  [ -e "$wd/store" ] || cp -r "$bundle/store" "$wd/store"
  [ -e "$wd/teacher" ] || ln -s "$(realpath "$teacher_run/teacher")" "$wd/teacher"
  f="$wd/eval/scores/teacher_pretrained.npz"
  [ -e "$f" ] || [ ! -e "$bundle/teacher_pretrained.npz" ] || cp "$bundle/teacher_pretrained.npz" "$f"
  stage pipeline "$wd" "$s" "--config.students=$rows"
  python bench/report.py --runs "$wd" --add-rows --out docs --name "$name" \
    --summary "$summary" --config-name "$config" --title "$title"
done
