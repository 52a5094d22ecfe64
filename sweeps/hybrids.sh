#!/usr/bin/env bash
# Hybrid conversions (issue 19, docs/hybrids.md), in one command: the CPU demo's softmax teacher (pretrained
# once, then cached), converted with each row of experiment=hybrids (DFW with a sliding softmax window of
# W = 8, 16, 32 or none, DFW with one softmax layer, softmax) with the demo's fine-tuning budget, each evaluated
# on copy and recall after training; then the hybrids table (report/report.md, above the runs table).
#   sweeps/hybrids.sh [extra Hydra overrides for the training runs, e.g. trainer.limit_val_batches=10]
# OUT=<folder> the output folder; PY=<python> the interpreter; TEACHER_ARGS="teacher.<key>=<value> ..." the
# teacher's stage-1 overrides, e.g. TEACHER_ARGS=teacher.experiment=recall_teacher (the teacher that can copy
# and recall) or TEACHER_ARGS=teacher.trainer.max_steps=3200 (a teacher trained longer).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
OUT=${OUT:-outputs/multirun/hybrids_$(date +%Y-%m-%d_%H-%M-%S)}
read -r -a TEACHER_OVERRIDES <<< "${TEACHER_ARGS:-}"

TEACHER=$($PY -m dfw.demo --teacher-only "${TEACHER_OVERRIDES[@]}" | tail -n 1)
echo "teacher: $TEACHER"
$PY -m dfw.train -m experiment=hybrids model.pretrained="$TEACHER" model.tokenizer="$TEACHER" \
    hydra.sweep.dir="$OUT" "$@" || echo "some runs failed: the table lists them"
$PY -m dfw.report "$OUT" --table hybrids
