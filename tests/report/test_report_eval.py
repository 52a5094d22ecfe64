"""dfw.report with dfw.eval's results: a column per task beside the training metrics (the teacher, evaluated
without training, as a row of its own), and the plots of ppl by position, copy accuracy against L and recall
accuracy against the number of pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dfw import report
from dfw.eval import evaluate
from dfw.report.evaluation import PLOTS
from tests.eval.test_eval_cli import eval_cfg
from tests.report.test_report import _table_row


@pytest.fixture
def sweep(tmp_path, trained_run) -> Path:
    root = tmp_path / "sweep"
    shutil.copytree(trained_run.dir, root / "0_decay")
    evaluate(eval_cfg(root / "0_decay" / "model", root / "0_decay" / "eval", "wandb=null"))
    evaluate(
        eval_cfg(root / "0_decay" / "model", root / "teacher" / "eval", "wandb=null", "tasks=[copy,recall]")
    )
    return root


@pytest.mark.slow
def test_report_puts_eval_columns_beside_training_metrics_and_plots_them(sweep, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert header.endswith("| steps | ppl | copy acc | recall acc |")
    trained = _table_row(text, "decay")
    ppl = next(
        line
        for line in (sweep / "0_decay" / "eval" / "results.csv").read_text().splitlines()
        if ",True," in line
    )
    assert trained[-3] == f"{float(ppl.split(',')[-3]):,.2f}"  # the ppl headline of results.csv
    teacher = _table_row(text, "decay (teacher)")  # evaluated only: no training columns, no ppl
    assert (
        teacher[3] == "—" and teacher[-3] == "—" and teacher[-2].endswith("%") and teacher[-1].endswith("%")
    )
    assert "copy: acc (random, mean over L); recall: acc (mean over pairs)" in text
    assert "Runs not in the table" not in text, "an evaluated-only model is not a failed run"
    for name in PLOTS:
        assert (out / name).stat().st_size > 0 and f"![{Path(name).stem}]({name})" in text


def test_a_folder_of_two_multiruns_lists_the_missing_jobs_of_each(tmp_path, trained_run):
    import yaml

    for sweep, attentions in (("eval_grid", "softmax,linear"), ("eval_state_size", "decay")):
        hydra_node = {
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "params": {"attention": attentions},
            },
            "overrides": {"task": []},
        }
        (tmp_path / sweep).mkdir()
        (tmp_path / sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra_node}))
    shutil.copytree(
        trained_run.dir, tmp_path / "eval_state_size" / "0_decay"
    )  # job 0 of the second sweep ran
    runs = report.load_runs(str(tmp_path))
    missing = sorted((Path(r.source).name, r.job) for r in runs if r.status == "missing")
    assert missing == [("eval_grid", 0), ("eval_grid", 1)]
    assert [r.status for r in runs if r.status != "missing"] == ["finished"]


def test_the_eval_folder_of_each_run_does_not_label_it():
    import pandas as pd

    from dfw.report import Run, label_runs

    runs = [
        Run(
            name=f"{i}_decay",
            source="",
            config={
                "attention.name": "decay",
                "attention.state_size": m,
                "eval.out_dir": f"/sweep/{i}_decay/eval",
            },
            history=pd.DataFrame(),
        )
        for i, m in enumerate((8, 16))
    ]
    label_runs(runs)
    assert [r.label for r in runs] == ["decay (state_size=8)", "decay (state_size=16)"]
