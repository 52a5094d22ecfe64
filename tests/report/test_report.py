"""`python -m dfw.report`: the runs of a Hydra multirun, one run directory, or a W&B project (through a
stand-in for `wandb.Api`: no W&B server is reachable here) become one table, with every run that did not
finish listed.

The multirun has two variants that finish (softmax, decay), one job that fails on a bad override
(data.block_size=300 > the tiny model's 256 positions) and one the failure kept from starting; the report
must give the logged numbers for the first two and list the other two."""

from __future__ import annotations

import csv
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dfw import report
from dfw.errors import ConfigError
from dfw.report.table import fmt_bytes
from tests.conftest import CONF, compose, run_module, tiny_overrides


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, text_files) -> Path:
    root = tmp_path_factory.mktemp("multirun")
    overrides = [
        o
        for o in tiny_overrides(root, text_files)
        if not o.startswith(("paths.output_dir", "data.block_size"))
    ]
    result = run_module(
        "dfw.train",
        "-m",
        *overrides,
        "export_dir=null",
        f"hydra.sweep.dir={root}",
        "data.block_size=32,300",
        "attention=softmax,decay",
    )
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


@pytest.mark.slow
def test_report_of_a_tiny_multirun_matches_the_logs_and_lists_failed_jobs(multirun, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(multirun), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith(
        capsys.readouterr().out.split("\nwritten to")[0].strip()
    )  # the table is also printed

    softmax_rows, decay_rows = _csv(multirun / "0_softmax"), _csv(multirun / "1_decay")
    values = {}
    for variant, rows in (("softmax", softmax_rows), ("decay", decay_rows)):
        cells = _table_row(text, variant)
        val = _logged(rows, "val/ppl")
        # converted = the validation before fit(); val ppl = the best of fine-tuning; test = the last logged.
        assert cells[2] == f"{val[0]:,.2f}" and cells[3] == f"{min(val[1:]):,.2f}"
        assert cells[4] == f"{_logged(rows, 'test/ppl')[-1]:,.2f}"
        state_bytes = _logged(rows, "model/state_bytes_per_sequence")[-1]
        assert cells[7] == fmt_bytes(state_bytes) and state_bytes > 0
        assert cells[8] == "4"  # steps
        values[variant] = min(val[1:])
    assert (
        _table_row(text, "softmax")[1] == "—" and _table_row(text, "decay")[1] == "32"
    )  # the preset's m: the head size
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
        assert f"({name})" in text  # linked from report.md


def test_every_logger_config_writes_the_csv_the_report_reads():
    options = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))
    assert "wandb" in options
    for option in options:
        csv_logger = compose(f"logger={option}", "paths.output_dir=/runs/a").logger.csv
        assert csv_logger._target_ == "lightning.pytorch.loggers.CSVLogger", option
        assert (csv_logger.save_dir, csv_logger.name, csv_logger.version) == ("/runs/a", "csv", ""), option


@pytest.mark.slow
def test_a_run_directory_reads_back_its_config_and_metrics(trained_run):
    run = report.read_run_dir(trained_run.dir)
    assert run.status == "finished" and run.reason == ""
    assert run.config["attention.name"] == "decay" and run.config["trainer.max_steps"] == 4
    assert run.val_ppl_converted == pytest.approx(trained_run.metrics["val/ppl_converted"])
    assert run.last("test/ppl") == pytest.approx(trained_run.metrics["test/ppl"])
    # Every validation in order: before fit(), then every 2 of the 4 steps.
    assert list(run.val_curve()) == _logged(_csv(trained_run.dir), "val/ppl") and len(run.val_curve()) == 3


@pytest.mark.slow
def test_interrupted_and_unfinished_runs_are_crashed(trained_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(trained_run.dir, interrupted, ignore=shutil.ignore_patterns("model", "*.ckpt"))
    (interrupted / "checkpoints" / "on-exception.ckpt").write_bytes(b"")
    run = report.read_run_dir(interrupted)
    assert run.status == "crashed" and run.reason == "interrupted at step 4"

    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained_run.dir, unfinished, ignore=shutil.ignore_patterns("model", "checkpoints"))
    metrics = unfinished / "csv" / "metrics.csv"
    rows = pd.read_csv(metrics)
    rows = rows[rows["test/ppl"].isna()]
    rows.to_csv(metrics, index=False)  # as if it stopped in the test
    run = report.read_run_dir(unfinished)
    assert run.status == "crashed" and "logged no perplexity" in run.reason
    rows[rows["step"] < 2].to_csv(metrics, index=False)  # as if it stopped at step 1 of 4
    run = report.read_run_dir(unfinished)
    assert run.status == "crashed" and run.reason == "stopped at step 1 of 4"


@pytest.mark.slow
def test_running_crashed_and_export_failed_runs_are_told_apart(trained_run, tmp_path):
    running = tmp_path / "running"
    shutil.copytree(trained_run.dir, running, ignore=shutil.ignore_patterns("model", "*.ckpt"))
    metrics = running / "csv" / "metrics.csv"
    rows = pd.read_csv(metrics)
    rows[rows["step"] < 2].to_csv(metrics, index=False)  # logged up to step 1 so far
    code = (
        f"import time\nfrom dfw import run_folder\nrun_folder.acquire({str(running)!r})\n"
        "print('locked', flush=True)\ntime.sleep(600)\n"
    )
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "locked"
        run = report.read_run_dir(running)
        assert (run.status, run.reason) == (
            "running",
            f"in progress (pid {live.pid} on {socket.gethostname()})",
        )
    finally:
        live.kill()
        live.wait()
    run = report.read_run_dir(running)  # the same run, killed: its lock is stale
    assert run.status == "crashed" and run.reason == "stopped at step 1 of 4"

    export_failed = tmp_path / "export-failed"
    shutil.copytree(trained_run.dir, export_failed, ignore=shutil.ignore_patterns("model"))
    run = report.read_run_dir(export_failed)
    assert (run.status, run.reason) == (
        "export failed",
        f"trained and tested, but {export_failed / 'model'} holds no exported model",
    )
    assert report.read_run_dir(trained_run.dir).status == "finished"


def test_jobs_are_expanded_as_hydras_basic_sweeper_does(tmp_path):
    """The sweeper's params, then the command line; a key given twice keeps its first place and last value;
    the last key varies fastest. Checked against Hydra's own sweeper (a private module: tests only)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = {"attention": "softmax,decay,rfa", "module.optimizer.lr": "1e-3,3e-4"}
    task = ["trainer.max_steps=10", "attention=decay,delta", "+tag=a,b", "seed=range(1,3)"]
    hydra_node = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
        "overrides": {"task": task},
    }
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra_node}))
    jobs = report.expected_jobs(tmp_path)
    arguments = [f"{k}={v}" for k, v in params.items()] + task
    assert jobs == BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
    assert len(jobs) == 2 * 2 * 2 * 2 and jobs[0] == [
        "attention=decay",
        "module.optimizer.lr=0.001",
        "trainer.max_steps=10",
        "+tag=a",
        "seed=1",
    ]
    assert report.expected_jobs(tmp_path / "elsewhere") is None  # not a multirun directory


class _RemoteRun:
    """A run as `wandb.Api().runs()` returns it: name, url, state, config, history()."""

    def __init__(self, name, attention, ppl, state):
        self.name, self.url, self.state = name, f"https://wandb.ai/e/p/runs/{name}", state
        self.config = {
            "config": {"attention": {"name": attention}, "test": True, "validate_before_fit": True},
            "_wandb": {"runtime": 12},
        }
        self._history = pd.DataFrame(
            {
                "trainer/global_step": [0, 10, 20, 20],
                "val/ppl": [ppl * 2, ppl * 1.5, ppl, None],
                "test/ppl": [None, None, None, ppl * 1.1],
            }
        )

    def history(self, samples, pandas):
        assert pandas and samples >= 10_000  # every logged row, not W&B's 500-row sample
        return self._history


@pytest.fixture
def wandb_api(monkeypatch):
    """wandb.Api replaced by a project of three runs (softmax, decay, and rfa which crashed)."""
    import wandb

    queries = []

    class Api:
        def __init__(self, **kwargs):
            pass

        def runs(self, path, filters=None):
            queries.append((path, filters))
            return [
                _RemoteRun("a", "softmax", 10.0, "finished"),
                _RemoteRun("b", "decay", 12.5, "finished"),
                _RemoteRun("c", "rfa", 20.0, "crashed"),
            ]

    monkeypatch.setattr(wandb, "Api", Api)
    return queries


def test_wandb_project_through_the_api(wandb_api, tmp_path):
    out = tmp_path / "report"
    assert report.main(["e/p", "--group", "g", "--tag", "t", "--out", str(out)]) == 0
    assert wandb_api == [("e/p", {"group": "g", "tags": {"$in": ["t"]}})]
    runs = report.load_runs("e/p")
    report.label_runs(runs)
    assert [(r.label, r.status, r.reason) for r in runs] == [
        ("softmax", "finished", ""),
        ("decay", "finished", ""),
        ("c", "crashed", "W&B state crashed"),
    ]
    assert "_wandb" not in str(runs[0].config)
    assert (
        runs[1].val_ppl == 12.5
        and runs[1].val_ppl_converted == 25.0
        and math.isclose(runs[1].last("test/ppl"), 13.75)
    )
    text = (out / "report.md").read_text()
    assert _table_row(text, "decay")[5] == "80.0%" and _table_row(text, "decay")[8] == "20"
    assert _table_row(text.split("Runs not in the table")[1], "c")[1:3] == ["crashed", "W&B state crashed"]


def test_unreachable_wandb_project_is_a_one_line_error(monkeypatch):
    import wandb

    def unreachable(**kwargs):
        raise ConnectionError("Max retries exceeded with url: https://api.wandb.ai/graphql\nmore detail")

    monkeypatch.setattr(wandb, "Api", unreachable)
    with pytest.raises(
        ConfigError,
        match=r"^could not read W&B project 'e/p' \(ConnectionError: Max retries .*graphql\); "
        r"without W&B, pass the multirun directory",
    ):
        report.load_runs("e/p")


@pytest.mark.slow
def test_bad_source_exits_with_one_line(tmp_path):
    result = run_module("dfw.report", str(tmp_path / "no" / "such" / "dir"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"error: '{tmp_path}/no/such/dir' is neither a run or multirun directory nor a W&B project "
        "(entity/project)"
    )


def test_a_directory_without_runs_is_a_config_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^no runs found in '.*' \(a run directory holds csv/metrics\.csv\)$"
    ):
        report.report(str(tmp_path))
