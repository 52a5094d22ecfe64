#!/usr/bin/env bash
# The recipes comparison: DFW and Hedgehog converted from the same small softmax model by each recipe of
# conf/recipe/ at equal training tokens (experiment=recipes), on the embedded Shakespeare corpus, on CPU, then reported.
#   sweeps/recipes.sh [extra Hydra overrides, e.g. budget_steps=200]
# Stage 1 of the CPU demo pretrains the softmax teacher (cached; reused when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}

TEACHER=$($PY -m dfw.demo --teacher-only | tail -n 1)
echo "teacher: $TEACHER"
SWEEP_DIR=outputs/multirun/recipes_$(date +%Y-%m-%d_%H-%M-%S)
$PY -m dfw.train -m experiment=recipes model.pretrained="$TEACHER" model.tokenizer="$TEACHER" \
    hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "some runs failed: the report lists them"
$PY -m dfw.report "$SWEEP_DIR"
