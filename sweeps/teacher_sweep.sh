#!/usr/bin/env bash
# A Hydra multirun of conf/experiment/EXPERIMENT.yaml, every run converted from the CPU demo's softmax
# teacher (stage 1 of `python -m dfw.demo`: pretrained once, then cached), then its report.
#   sweeps/teacher_sweep.sh EXPERIMENT [extra Hydra overrides]      (small_grid.sh and recipes.sh call it)
set -euo pipefail
cd "$(dirname "$0")/.."
EXPERIMENT=${1:?usage: sweeps/teacher_sweep.sh EXPERIMENT [overrides...]}
shift
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

TEACHER=$($PY -m dfw.demo --teacher-only | tail -n 1)
echo "teacher: $TEACHER"
SWEEP_DIR=outputs/multirun/${EXPERIMENT}_$(date +%Y-%m-%d_%H-%M-%S)
$PY -m dfw.train -m experiment="$EXPERIMENT" model.pretrained="$TEACHER" model.tokenizer="$TEACHER" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "some runs failed: the report lists them"
$PY -m dfw.report "$SWEEP_DIR"
