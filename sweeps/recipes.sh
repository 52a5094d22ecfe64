#!/usr/bin/env bash
# The recipes comparison: DFW and Hedgehog converted from the same small softmax model by each recipe of
# conf/recipe/ at equal training tokens (experiment=recipes), on the embedded Shakespeare corpus, on CPU, then reported.
#   sweeps/recipes.sh [extra Hydra overrides, e.g. budget_steps=200]
# Stage 1 of the CPU demo pretrains the softmax teacher (cached; reused when it exists).
exec "$(dirname "$0")/teacher_sweep.sh" recipes "$@"
