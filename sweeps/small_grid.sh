#!/usr/bin/env bash
# The README's results table: every attention preset converted from the same small softmax model and
# fine-tuned on the embedded Shakespeare corpus, on CPU (about 30 minutes on 2 cores), then reported.
#   sweeps/small_grid.sh [extra Hydra overrides, e.g. trainer.max_steps=300]
# Stage 1 of the CPU demo pretrains the softmax teacher (cached; reused when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

TEACHER=$($PY -m dfw.demo --teacher-only | tail -n 1)
echo "teacher: $TEACHER"
SWEEP_DIR=outputs/multirun/small_grid_$(date +%Y-%m-%d_%H-%M-%S)
$PY -m dfw.train -m experiment=small_grid model.pretrained="$TEACHER" model.tokenizer="$TEACHER" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "some runs failed: the report lists them"
$PY -m dfw.report "$SWEEP_DIR"
