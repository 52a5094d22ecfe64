#!/usr/bin/env bash
# The README's results table: every attention preset converted from the same small softmax model and
# fine-tuned on the embedded Shakespeare corpus, on CPU (about 30 minutes on 2 cores), then reported.
#   sweeps/small_grid.sh [extra Hydra overrides, e.g. trainer.max_steps=300]
# Stage 1 of the CPU demo pretrains the softmax teacher (cached; reused when it exists).
exec "$(dirname "$0")/teacher_sweep.sh" small_grid "$@"
