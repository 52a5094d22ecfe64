"""The hybrids table (issue 19, docs/hybrids.md): `python -m dfw.report <sweep> --table hybrids`.

One row per finished run of `experiment=hybrids` (sweeps/hybrids.sh), in the sweep's job order: the variant
(DFW, DFW with a sliding softmax window of W tokens, DFW with softmax kept in some layers, softmax), val ppl
as converted, after attention transfer and after fine-tuning (the best validation of fine-tuning), the share
of softmax quality retained as converted and after fine-tuning, copy accuracy at each span length L (random
tokens) and recall accuracy (mean over the numbers of pairs).

Retained = reference val ppl / the row's val ppl, where the reference is the best softmax available: the
better (lower) of the teacher (the softmax run as converted: nothing is converted) and softmax fine-tuned with
the same budget. Against fine-tuned softmax alone, a conversion would look better than it is whenever
fine-tuning makes the teacher worse, which happens on a teacher trained to convergence.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .evaluation import fmt_value, headline_value
from .sources import Run
from .table import fmt_number

SOFTMAX = "softmax"


def variant(run: Run) -> str:
    """The row's name, from its attention config (not from the folder or the sweep's choice names)."""
    name = str(run.config.get("attention.name", "?"))
    if name == SOFTMAX:
        return SOFTMAX
    parts = ["DFW" if name == "decay" else name]
    window = run.config.get("attention.window")
    if window:
        parts.append(f"window {window}")
    layers = run.config.get("attention.softmax_layers")
    every_k = run.config.get("attention.softmax_layers.every_k")
    if isinstance(layers, list) and layers:
        parts.append(f"softmax in layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}")
    elif every_k:
        parts.append(f"softmax every {every_k} layers")
    return ", ".join(parts)


def reference_ppl(runs: list[Run]) -> float:
    """The best softmax available: the lowest of the teacher's val ppl (a softmax run as converted) and of
    softmax fine-tuned (nan without a finished softmax run)."""
    values = [
        value
        for run in runs
        if run.status == "finished" and run.config.get("attention.name") == SOFTMAX
        for value in (run.val_ppl_converted, run.val_ppl)
        if not math.isnan(value)
    ]
    return min(values) if values else math.nan


def copy_lengths(runs: list[Run]) -> list[int]:
    """Every span length L any run's copy task measured (random tokens), ascending."""
    lengths: set[int] = set()
    for run in runs:
        rows = _copy_rows(run.evaluation)
        lengths.update(int(x) for x in rows["x"])
    return sorted(lengths)


def _copy_rows(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=["x", "value"])
    chosen = (
        (frame["task"] == "copy")
        & (frame["metric"] == "acc")
        & (frame["variant"] == "random")
        & (frame["axis"] == "L")
        & frame["x"].notna()
    )
    return frame[chosen]


def _copy_at(run: Run, length: int) -> float:
    rows = _copy_rows(run.evaluation)
    rows = rows[rows["x"].astype(float) == length]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def _share(reference: float, ppl: float) -> str:
    if math.isnan(reference) or math.isnan(ppl) or ppl <= 0:
        return "—"
    return f"{100 * reference / ppl:.1f}%"


def _order(run: Run) -> tuple[Any, ...]:
    return (run.job is None, run.job if run.job is not None else 0, variant(run))


def markdown(runs: list[Run], title: str = "Hybrid conversions") -> str:
    """The table (and a line per run that did not finish), as Markdown."""
    reference = reference_ppl(runs)
    done = sorted((r for r in runs if r.status == "finished"), key=_order)
    lengths = copy_lengths(done)
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| variant | val ppl, converted | val ppl, after transfer | val ppl, fine-tuned "
        "| retained, converted | retained, fine-tuned |"
        + "".join(f" copy acc, L = {L} |" for L in lengths)
        + " recall acc |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---:|",
    ]
    for run in done:
        converted, transfer, finetuned = run.val_ppl_converted, run.val_ppl_transfer, run.val_ppl
        copies = "".join(f" {fmt_value('acc', _copy_at(run, L))} |" for L in lengths)
        recall = fmt_value("acc", headline_value(run.evaluation, "recall", "acc", ""))
        lines.append(
            f"| {variant(run)} | {fmt_number(converted)} | {fmt_number(transfer)} | {fmt_number(finetuned)} "
            f"| {_share(reference, converted)} | {_share(reference, finetuned)} |{copies} {recall} |"
        )
    problems = [r for r in runs if r.status != "finished"]
    if problems:
        lines += ["", "Not in the table (not finished):", ""]
        lines += [f"- {r.name}: {r.status}, {r.reason} ({' '.join(r.overrides)})" for r in problems]
    teacher = "—" if math.isnan(reference) else f"{reference:.2f}"
    lines += [
        "",
        f"Retained = the best softmax val ppl available ({teacher}: the lower of the teacher, which is the "
        "softmax row as converted, and softmax fine-tuned with the same budget) / the row's val ppl. "
        "Fine-tuned: the best validation of fine-tuning. Copy: top-1 accuracy on the second copy of a span "
        "of L random tokens; recall: accuracy of the values, mean over the numbers of key-value pairs "
        "(dfw.eval, docs/evaluation.md).",
    ]
    if math.isnan(reference):
        lines += ["", "No finished softmax run: the shares retained are not computed."]
    return "\n".join(lines) + "\n"
