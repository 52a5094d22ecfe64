"""dfw.eval's results in the report: a column per task beside the training metrics, and three plots (ppl by
position, copy accuracy against L, recall accuracy against the number of pairs), one line per run.

A run's evaluation is `<run>/eval/results.csv` (dfw.train's `eval.tasks=[...]`, or `python -m dfw.eval
out_dir=<run>/eval`); a directory holding only that file is a model evaluated without training in the
sweep (the teacher it was converted from), reported as status `evaluated`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

EVAL_RESULTS = Path("eval") / "results.csv"
PLOTS = ("ppl_by_position.png", "copy_acc_vs_length.png", "recall_acc_vs_pairs.png")
TASK_ORDER = ("ppl", "copy", "recall", "passkey", "lm_eval")  # the order of the report's eval columns


def read_evaluation(run_dir: Path) -> pd.DataFrame:
    """The rows of `<run_dir>/eval/results.csv` (empty when there is none)."""
    path = run_dir / EVAL_RESULTS
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    frame = pd.read_csv(path, keep_default_na=False, na_values={"x": [""], "x_to": [""], "state_size": [""]})
    frame["headline"] = frame["headline"].astype(str).str.lower() == "true"
    return frame


def headline_columns(evaluations: list[pd.DataFrame]) -> list[tuple[str, str, str, str]]:
    """(header, task, metric, variant) of every headline number any run has, in first-seen order."""
    columns: dict[tuple[str, str, str], str] = {}
    for frame in evaluations:
        if frame.empty:
            continue
        for row in frame[frame["headline"]].itertuples():
            key = (row.task, row.metric, row.variant if row.task == "lm_eval" else "")
            header = (
                f"{row.variant} {row.metric}"
                if row.task == "lm_eval"
                else row.task
                if row.metric == row.task
                else f"{row.task} {row.metric}"
            )
            columns.setdefault(key, header)
    order = {task: i for i, task in enumerate(TASK_ORDER)}
    return [
        (header, *key)
        for key, header in sorted(columns.items(), key=lambda item: order.get(item[0][0], len(order)))
    ]


def headline_value(frame: pd.DataFrame, task: str, metric: str, variant: str) -> float:
    if frame.empty:
        return math.nan
    rows = frame[frame["headline"] & (frame["task"] == task) & (frame["metric"] == metric)]
    if variant:
        rows = rows[rows["variant"] == variant]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def fmt_value(metric: str, value: float) -> str:
    if math.isnan(value):
        return "—"
    if metric in ("acc", "exact_match"):
        return f"{100 * value:.1f}%"
    return f"{value:,.2f}"


def headline_note(evaluations: list[pd.DataFrame]) -> str:
    """What each eval column is (its setting as dfw.eval recorded it)."""
    seen: dict[str, str] = {}
    for frame in evaluations:
        if frame.empty:
            continue
        for row in frame[frame["headline"]].itertuples():
            if row.task != "lm_eval":
                where = f"mean over {row.axis}" if row.axis else ""
                setting = ", ".join(part for part in (row.variant, where) if part)
                seen.setdefault(row.task, f"{row.task}: {row.metric} ({setting})")
    order = {task: i for i, task in enumerate(TASK_ORDER)}
    return "; ".join(
        note for _, note in sorted(seen.items(), key=lambda item: order.get(item[0], len(order)))
    )


def _curves(frame: pd.DataFrame, task: str, metric: str, axis: str) -> dict[str, pd.DataFrame]:
    """variant -> rows of one swept metric, sorted by x."""
    if frame.empty:
        return {}
    rows = frame[
        (frame["task"] == task) & (frame["metric"] == metric) & (frame["axis"] == axis) & frame["x"].notna()
    ]
    return {variant: group.sort_values("x") for variant, group in rows.groupby("variant", sort=False)}


def plot_evaluation(runs: list, out_dir: Path) -> list[Path]:
    """The three plots of the runs that have an evaluation; returns the paths written (none without one)."""
    evaluated = [run for run in runs if not run.evaluation.empty]
    if not evaluated:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    specs = [
        (
            "ppl",
            "ppl",
            "position",
            "position in the context (bins)",
            "perplexity",
            "Perplexity by position in the context",
            "log",
        ),
        (
            "copy",
            "acc",
            "L",
            "span length L (tokens, copied once)",
            "top-1 accuracy on the second copy",
            "In-context copying",
            "linear",
        ),
        (
            "recall",
            "acc",
            "pairs",
            "key-value pairs N",
            "top-1 accuracy of the recalled values",
            "Associative recall (MQAR)",
            "linear",
        ),
    ]
    paths = []
    for name, (task, metric, axis, xlabel, ylabel, title, yscale) in zip(PLOTS, specs, strict=True):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for run in evaluated:
            color = None
            for i, (variant, rows) in enumerate(_curves(run.evaluation, task, metric, axis).items()):
                label = run.label + (f", {variant}" if task == "copy" else "")
                (line,) = ax.plot(
                    rows["x"],
                    rows["value"],
                    marker="o",
                    markersize=3,
                    label=label,
                    color=color,
                    linestyle="-" if i == 0 else "--",
                )
                color, drawn = line.get_color(), True
        if not drawn:
            plt.close(fig)
            continue
        if axis == "position":
            ax.set_xscale("symlog", base=2, linthresh=16)  # bins start at 0, 16, 32, 64, ...
            bins = _curves(evaluated[0].evaluation, task, metric, axis)
            first = next(iter(bins.values()), None)
            if first is not None:
                ax.set_xticks(
                    first["x"], [f"{int(a)}-{int(b)}" for a, b in zip(first["x"], first["x_to"], strict=True)]
                )
        else:
            ax.set_xscale("log", base=2)
            values = sorted(
                {
                    x
                    for run in evaluated
                    for rows in _curves(run.evaluation, task, metric, axis).values()
                    for x in rows["x"]
                }
            )
            ax.set_xticks(values, [f"{int(x)}" for x in values])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale=yscale)
        if metric == "acc":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
