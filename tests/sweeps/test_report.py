"""A tiny multirun reported end to end: `python -m dfw.train -m ...` then `python -m dfw.report <dir>`.

The sweep has two variants that finish (softmax, decay), one job that fails on a bad override
(data.block_size=300 > the tiny model's 256 positions) and one the failure kept from starting; the report
must give the logged numbers for the first two and list the other two."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dfw import report
from tests.conftest import REPO, tiny_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, text_files) -> Path:
    root = tmp_path_factory.mktemp("multirun")
    overrides = [o for o in tiny_overrides(root, text_files) if not o.startswith(("paths.output_dir", "logger=", "data.block_size"))]
    result = subprocess.run(
        [sys.executable, "-m", "dfw.train", "-m", *overrides, "logger=wandb", "export_dir=null",
         f"hydra.sweep.dir={root}", "data.block_size=32,300", "attention=softmax,decay"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0, "the jobs with data.block_size=300 must fail"
    assert "data.block_size=300 is longer than the model's context" in result.stdout + result.stderr
    # Both failing jobs ran (a failed job does not end the sweep); remove the last one's folder to
    # stand for a job that never started (a sweep killed midway).
    assert (root / "3_decay").is_dir()
    shutil.rmtree(root / "3_decay")
    return root


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def _table_row(text: str, variant: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == variant:
            return cells
    raise AssertionError(f"no row for {variant!r} in\n{text}")


def test_report_of_a_tiny_multirun_matches_the_logs_and_lists_failed_jobs(multirun, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dfw.report", str(multirun), "--out", str(out)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = (out / "report.md").read_text()

    softmax_rows, decay_rows = _csv(multirun / "0_softmax"), _csv(multirun / "1_decay")
    values = {}
    for variant, rows in (("softmax", softmax_rows), ("decay", decay_rows)):
        cells = _table_row(text, variant)
        val = _logged(rows, "val/ppl")
        # converted = the validation before fit(); val ppl = the best of fine-tuning; test = the last logged.
        assert cells[2] == f"{val[0]:,.2f}" and cells[3] == f"{min(val[1:]):,.2f}"
        assert cells[4] == f"{_logged(rows, 'test/ppl')[-1]:,.2f}"
        state_bytes = _logged(rows, "model/state_bytes_per_sequence")[-1]
        assert cells[7] == report._fmt_bytes(state_bytes) and state_bytes > 0
        values[variant] = min(val[1:])
    assert _table_row(text, "softmax")[1] == "—" and _table_row(text, "decay")[1] == "32"  # the preset's m: the head size
    assert _table_row(text, "softmax")[5] == "100.0%"
    assert _table_row(text, "decay")[5] == f"{100 * values['softmax'] / values['decay']:.1f}%"

    # Not dropped silently: the job that failed (with its error) and the one that never started.
    problems = text.split("Runs not in the table")[1]
    crashed, missing = _table_row(problems, "2_softmax"), _table_row(problems, "job 3")
    assert crashed[1] == "crashed" and "data.block_size=300 is longer" in crashed[2]
    assert crashed[3] == "data.block_size=300 attention=softmax"
    assert missing[1] == "missing" and missing[3] == "data.block_size=300 attention=decay"

    for name in ("val_ppl_vs_step.png", "ppl_vs_state_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_offline_wandb_run_reads_like_its_csv_logs(multirun, tmp_path):
    """A run with only its offline W&B directory (no csv/) gives the same config and metrics."""
    copy = tmp_path / "1_decay"
    shutil.copytree(multirun / "1_decay", copy, ignore=shutil.ignore_patterns("checkpoints"))
    from_csv = report.read_run_dir(copy)
    shutil.rmtree(copy / "csv")
    from_wandb = report.read_run_dir(copy)
    assert "/wandb/offline-run-" in from_wandb.source and from_wandb.status == "finished"
    assert from_wandb.config == from_csv.config
    pd.testing.assert_series_equal(from_wandb.val_curve(), from_csv.val_curve(), check_dtype=False)
    for key in (report.TEST_PPL, report.STATE_BYTES, report.PARAMS_NEW):
        assert from_wandb.last(key) == pytest.approx(from_csv.last(key)), key


def test_interrupted_and_unfinished_runs_are_crashed(multirun, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(multirun / "1_decay", interrupted, ignore=shutil.ignore_patterns("wandb"))
    (interrupted / "checkpoints" / "on-exception.ckpt").write_bytes(b"")
    assert report.read_run_dir(interrupted).status == "crashed"

    unfinished = tmp_path / "unfinished"
    shutil.copytree(multirun / "1_decay", unfinished, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    metrics = unfinished / "csv" / "metrics.csv"
    rows = pd.read_csv(metrics)
    rows = rows[rows["test/ppl"].isna()]
    rows.to_csv(metrics, index=False)  # as if it stopped in the test
    run = report.read_run_dir(unfinished)
    assert run.status == "crashed" and "logged no perplexity" in run.reason
    rows[rows["step"] < 2].to_csv(metrics, index=False)  # as if it stopped at step 1 of 4
    run = report.read_run_dir(unfinished)
    assert run.status == "crashed" and run.reason == "stopped at step 1 of 4"


def test_wandb_project_through_the_api(monkeypatch):
    """The online path: runs, configs and histories as the W&B API returns them (stubbed: no network here)."""

    class RemoteRun:
        def __init__(self, name, attention, ppl, state):
            self.name, self.url, self.state = name, f"https://wandb.ai/e/p/runs/{name}", state
            self.config = {"config": {"attention": {"name": attention}, "test": True, "validate_before_fit": True}}
            self._history = pd.DataFrame({
                "trainer/global_step": [0, 10, 20, 20], "val/ppl": [ppl * 2, ppl * 1.5, ppl, None],
                "test/ppl": [None, None, None, ppl * 1.1],
            })  # fmt: skip

        def history(self, samples, pandas):
            return self._history

    class Api:
        def __init__(self, timeout):
            pass

        def runs(self, path, filters=None):
            assert path == "e/p" and filters == {"group": "g"}
            return [RemoteRun("a", "softmax", 10.0, "finished"), RemoteRun("b", "decay", 12.5, "finished"),
                    RemoteRun("c", "rfa", 20.0, "crashed")]  # fmt: skip

    import wandb

    monkeypatch.setattr(wandb, "Api", Api)
    runs = report.load_runs("e/p", group="g")
    report.label_runs(runs)
    assert [(r.label, r.status) for r in runs] == [("softmax", "finished"), ("decay", "finished"), ("c", "crashed")]
    assert runs[1].val_ppl == 12.5 and runs[1].val_ppl_converted == 25.0 and math.isclose(runs[1].last("test/ppl"), 13.75)
    text = report.markdown(runs)
    assert _table_row(text, "decay")[5] == "80.0%"
    assert _table_row(text.split("Runs not in the table")[1], "c")[1] == "crashed"
