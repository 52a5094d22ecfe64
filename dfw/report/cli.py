"""`python -m dfw.report`: read the runs, write report.md and the plots, print the table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dfw.errors import ConfigError, run_or_exit

from . import hybrids
from .evaluation import plot_evaluation
from .plots import plot
from .sources import load_runs
from .table import label_runs, markdown

log = logging.getLogger("dfw.report")
TABLES = ("runs", "hybrids")  # --table: the report's table of every run; the hybrids sweep's (hybrids.py)


def report(
    source: str,
    out_dir: str | Path | None = None,
    baseline: str = "softmax",
    group: str | None = None,
    tag: str | None = None,
    table: str = "runs",
) -> Path:
    """Read the runs of `source`, write report.md and the plots into `out_dir`; returns report.md's path.
    Default `out_dir`: `<source>/report` for a directory, `outputs/reports/<entity>_<project>` for W&B.
    `table`: "runs" (one row per run), or "hybrids": the hybrids table (`hybrids.py`) above it."""
    if table not in TABLES:
        raise ConfigError(f"--table {table}: not a table of dfw.report; use one of {', '.join(TABLES)}")
    runs = load_runs(source, group, tag)
    if not runs:
        raise ConfigError(f"no runs found in {source!r} (a run directory holds csv/metrics.csv)")
    label_runs(runs)
    local = Path(source).expanduser().is_dir()
    out = (
        Path(out_dir)
        if out_dir
        else (Path(source) / "report" if local else Path("outputs/reports") / source.replace("/", "_"))
    )
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(runs, out, baseline) + plot_evaluation(runs, out)
    body = (hybrids.markdown(runs) + "\n" if table == "hybrids" else "") + markdown(runs, baseline)
    body += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "report.md").write_text(body)
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    # The package's docstring: dfw.report is loaded before any of its modules (no import, so no cycle).
    description = sys.modules[__package__].__doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m dfw.report", description=description.split("\n\n")[0])
    parser.add_argument("source", help="a multirun (or run) directory, or a W&B project entity/project")
    parser.add_argument("--out", help="where to write report.md and the plots (default: <source>/report)")
    parser.add_argument(
        "--baseline", default="softmax", help="attention.name of the reference run (default: softmax)"
    )
    parser.add_argument("--group", help="W&B only: the runs of this group")
    parser.add_argument("--tag", help="W&B only: the runs with this tag")
    parser.add_argument(
        "--table",
        choices=TABLES,
        default="runs",
        help="hybrids: also the table of experiment=hybrids (variant, val ppl converted / after transfer / "
        "fine-tuned, retained, copy and recall; docs/hybrids.md) above the runs table",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = run_or_exit(
        report, args.source, args.out, args.baseline, args.group, args.tag, args.table, logger=log
    )
    print(path.read_text().split("\n![")[0])
    print(f"written to {path} (plots beside it)")
    return 0
