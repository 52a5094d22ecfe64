"""Compare runs without a dashboard: `python -m dfw.report <multirun dir | W&B project> [--out DIR]`.

Reads every run of a sweep and writes `report.md` (one row per run: variant, state size, validation and
test perplexity, share of softmax quality retained, training tokens/s, state bytes per sequence) and two
plots, `val_ppl_vs_step.png` and `ppl_vs_state_size.png`. Runs that crashed, stopped early or never
started are listed under the table, with the reason where one was logged; none is dropped silently.

`--table hybrids` puts the table of `experiment=hybrids` above it (`hybrids.py`, docs/hybrids.md): val ppl
as converted, after attention transfer and fine-tuned, retained against the best softmax available, copy
and recall accuracy.

Sources (`sources.py`):
  - a local run directory: `csv/metrics.csv` + `csv/hparams.yaml`, which every run writes (with either
    logger config);
  - a Hydra multirun directory: every job directory in it, and its `multirun.yaml`, from which the jobs the
    sweep should have run are listed again, so a job that never started shows up as missing;
  - a W&B project (`entity/project` or `project`), through the W&B API (`wandb.Api()`), when online.

Definitions: validation perplexity is the best one logged during fine-tuning (the checkpoint the test
evaluates), `converted` the one before any fine-tuning (and before attention transfer, which is validated
too); share retained = softmax val ppl / run val ppl, with the sweep's softmax run as the reference (1.0 =
as good as softmax); training tokens/s is the median of `train/device/items_per_sec`; state bytes per
sequence is `model/state_bytes_per_sequence` (float32, after `data.block_size` tokens; softmax's KV cache
grows with the context, the other states do not).
"""

from .cli import main, report
from .plots import plot
from .sources import Run, expected_jobs, load_runs, read_run_dir
from .table import label_runs, markdown

__all__ = [
    "Run",
    "expected_jobs",
    "label_runs",
    "load_runs",
    "main",
    "markdown",
    "plot",
    "read_run_dir",
    "report",
]
