#!/usr/bin/env bash
# What a conversion keeps beyond perplexity (docs/evaluation.md), in one command: the softmax teacher that can
# copy and recall (experiment=recall_teacher: pretrained once, then cached like the demo's teacher), every
# attention preset converted from it with the small grid's recipe (experiment=eval_grid) and DFW at state size
# m = 8, 16, 32, 64 (experiment=eval_state_size), each evaluated after training by dfw.eval (ppl overall and by
# position, copy at each L, recall at each number of pairs), the teacher by `python -m dfw.eval`; then one
# report (report/report.md and its plots) under the output folder.
#   sweeps/eval_grid.sh [extra Hydra overrides for the training runs, e.g. trainer.max_steps=200]
# OUT=<folder> to choose the output folder; PY=<python> the interpreter; TEACHER_ARGS="teacher.<key>=<value> ..."
# the teacher's stage-1 overrides (default: teacher.experiment=recall_teacher; e.g. TEACHER_ARGS="" for the demo's
# teacher, or teacher.experiment=recall_teacher teacher.trainer.max_steps=6000 for a longer recipe).
# Measured in pieces (docs/evaluation.md, commit 2eb589a): the teacher's 4000 steps 26 min on one thread beside
# another run; its evaluation, the seven presets and DFW's four state sizes 40-odd min, two runs side by side on
# one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
OUT=${OUT:-outputs/multirun/eval_grid_$(date +%Y-%m-%d_%H-%M-%S)}
TASKS="tasks=[ppl,copy,recall]"
read -r -a TEACHER_OVERRIDES <<< "${TEACHER_ARGS-teacher.experiment=recall_teacher}"

TEACHER=$($PY -m dfw.demo --teacher-only "${TEACHER_OVERRIDES[@]}" | tail -n 1)
echo "teacher: $TEACHER"
$PY -m dfw.eval model="$TEACHER" "$TASKS" out_dir="$OUT/teacher/eval" progress=false
for EXPERIMENT in eval_grid eval_state_size; do
    $PY -m dfw.train -m experiment=$EXPERIMENT model.pretrained="$TEACHER" model.tokenizer="$TEACHER" \
        hydra.sweep.dir="$OUT/$EXPERIMENT" "$@" || echo "some runs of $EXPERIMENT failed: the report lists them"
done
$PY -m dfw.report "$OUT"
