"""The report's Markdown: one row per run that finished (or diverged), then the runs that did not."""

from __future__ import annotations

import json
import math
import re

from .evaluation import fmt_value, headline_columns, headline_note, headline_value
from .sources import STATE_BYTES, STEP, TEST_PPL, Run

# Config keys that differ between runs without making them different experiments.
VOLATILE_KEYS = re.compile(
    r"^(paths|hydra)\.|(dirpath|save_dir|default_root_dir|export_dir|out_dir|cache_dir|ckpt_path|enable_progress_bar)$"
    r"|^logger\.wandb\.(name|id|group|tags|mode)|^module\.scheduler\.num_training_steps$|^run_name$"
)


def label_runs(runs: list[Run]) -> None:
    """Variant label = attention.name + the config values that differ between the finished runs of that
    attention; a run that did not finish is named by its own overrides among the sweep's."""
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    for run in runs:
        run.overrides = [o for o in run.overrides if o not in common]
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        if run.status in ("finished", "diverged"):  # their configs are the resolved ones the runs logged
            by_name.setdefault(str(run.config.get("attention.name", "?")), []).append(run)
        elif run.status == "evaluated":  # a model evaluated without training in the sweep (the teacher)
            run.label = f"{run.config.get('attention.name')} ({run.name})"
        else:
            run.label = " ".join(run.overrides) or run.name
    for name, group in by_name.items():
        keys = sorted({k for run in group for k in run.config if not VOLATILE_KEYS.search(k)})
        varying = [k for k in keys if len({json.dumps(run.config.get(k), default=str) for run in group}) > 1]
        for run in group:
            details = ", ".join(f"{k.rsplit('.', 1)[-1]}={run.config.get(k)}" for k in varying)
            run.label = f"{name} ({details})" if details else name


def fmt_number(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def fmt_bytes(value: float) -> str:
    if math.isnan(value):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return ""


def reference_ppl(runs: list[Run], baseline: str) -> float:
    """Validation perplexity of the best finished `baseline` run (nan when there is none)."""
    values = [
        r.val_ppl for r in runs if r.status == "finished" and r.config.get("attention.name") == baseline
    ]
    return min(values) if values else math.nan


def markdown(runs: list[Run], baseline: str = "softmax", title: str = "") -> str:
    reference = reference_ppl(runs, baseline)
    done = [r for r in runs if r.status in ("finished", "diverged", "evaluated")]
    done.sort(
        key=lambda r: (r.status != "evaluated", r.config.get("attention.name") != baseline)
    )  # teacher, reference
    evals = headline_columns([r.evaluation for r in done])  # dfw.eval's tasks, a column each (evaluation.py)
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| variant | state size m | val ppl, converted | val ppl | test ppl | softmax quality retained "
        "| train tokens/s | state bytes / sequence | steps |"
        + "".join(f" {header} |" for header, *_ in evals),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(evals),
    ]
    for run in done:
        share = reference / run.val_ppl if run.val_ppl > 0 else math.nan
        m = run.state_size
        steps = str(int(run.history[STEP].max())) if STEP in run.history else "—"
        cells = "".join(
            f" {fmt_value(metric, headline_value(run.evaluation, task, metric, variant))} |"
            for _, task, metric, variant in evals
        )
        lines.append(
            f"| {run.label} | {'—' if math.isnan(m) else int(m)} | {fmt_number(run.val_ppl_converted)} "
            f"| {fmt_number(run.val_ppl)} | {fmt_number(run.last(TEST_PPL))} "
            f"| {'—' if math.isnan(share) else f'{100 * share:.1f}%'} | {fmt_number(run.tokens_per_sec, 0)} "
            f"| {fmt_bytes(run.last(STATE_BYTES))} | {steps} |{cells}"
        )
    if math.isnan(reference):
        lines += ["", f"No finished `{baseline}` run: the share of softmax quality retained is not computed."]
    problems = [r for r in runs if r.status not in ("finished", "evaluated")]
    if problems:
        lines += [
            "",
            "Runs not in the table, or not finished:",
            "",
            "| run | status | reason | overrides |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r.name} | {r.status} | {r.reason} | {' '.join(r.overrides)} |" for r in problems]
    lines += [
        "",
        "val ppl: best validation perplexity of fine-tuning (converted: before it); softmax quality "
        f"retained = {baseline} val ppl / val ppl; train tokens/s: median over training; state bytes / "
        "sequence: generation state of one sequence after a training-length context, float32 (softmax: the "
        "KV cache, which grows with the context)."
        + (
            f" Evaluation (dfw.eval, docs/evaluation.md): {headline_note([r.evaluation for r in done])}."
            if evals
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"
