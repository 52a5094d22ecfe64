"""`python -m dfw.report <sweep> --table hybrids` on a synthetic folder of experiment=hybrids: each run's
files as dfw.train writes them (csv/metrics.csv in logging order, csv/hparams.yaml, eval/results.csv,
Hydra's job files and the sweep's multirun.yaml), with numbers chosen so that every cell of the table is
known."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from dfw import report
from dfw.report import hybrids, load_runs
from tests.report.test_report import _table_row

EVAL_COLUMNS = (
    "model,kind,attention,state_size,state_bytes,context,parameters,task,metric,variant,axis,x,x_to,value,"
    "headline,seed"
)
ROWS = ["dfw", "dfw_window8", "dfw_window16", "dfw_window32", "dfw_softmax_layer", "softmax"]

# job -> (attention options, val ppl: converted, after transfer (None: no transfer), during fine-tuning;
# copy at L = 8, 16; recall at 4, 8 pairs). Job 3 (window 32) never started.
RUNS = {
    0: ({"name": "decay"}, (500.0, 300.0, [120.0, 100.0]), (0.5, 0.25), (0.1, 0.0)),
    1: ({"name": "decay", "window": 8}, (150.0, 140.0, [95.0, 90.0]), (0.75, 0.5), (0.2, 0.1)),
    2: ({"name": "decay", "window": 16}, (110.0, 105.0, [92.0, 88.0]), (1.0, 0.75), (0.3, 0.2)),
    4: ({"name": "decay", "softmax_layers": [1]}, (200.0, 150.0, [85.0, 84.0]), (1.0, 1.0), (0.5, 0.5)),
    5: ({"name": "softmax"}, (80.0, None, [82.0, 81.0]), (1.0, 1.0), (1.0, 0.75)),
}


def _write_run(folder: Path, job: int, attention: dict, ppl: tuple, copy: tuple, recall: tuple) -> None:
    converted, transfer, during = ppl
    (folder / "csv").mkdir(parents=True)
    (folder / "eval").mkdir()
    (folder / ".hydra").mkdir()
    full = {"window": None, "softmax_layers": None, **attention}
    config = {
        "attention": full,
        "trainer": {"max_steps": 300},
        "validate_before_fit": True,
        "export_dir": None,
        "run_name": f"{ROWS[job]}-shakespeare-small-shakespeare",  # as conf/hybrid/ names the runs
    }
    (folder / "csv" / "hparams.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"hybrid={ROWS[job]}"]))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": job}}}))
    # In the order dfw.train logs: converted and after transfer at step 0, then training and fine-tuning.
    rows = [{"step": 0, "val/ppl": converted}]
    if transfer is not None:
        rows += [{"step": 0, "transfer/loss": 1.0}, {"step": 0, "val/ppl": transfer}]
    rows += [
        {"step": 19, "train/loss": 4.0},
        {"step": 99, "val/ppl": during[0]},
        {"step": 299, "val/ppl": during[1]},
    ]
    rows += [{"step": 299, "test/ppl": during[1] + 1}]
    with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "transfer/loss", "val/ppl", "test/ppl"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [EVAL_COLUMNS]
    common = f"{folder},trained run,{attention['name']},32,1000,128,100"
    for L, value in zip((8, 16), copy, strict=True):
        lines.append(f"{common},copy,acc,random,L,{L},,{value},False,1234")
        lines.append(f"{common},copy,acc,text,L,{L},,0.99,False,1234")  # text spans: not the table's
    lines.append(f"{common},copy,acc,random,L,,,{sum(copy) / 2},True,1234")
    for pairs, value in zip((4, 8), recall, strict=True):
        lines.append(f"{common},recall,acc,,pairs,{pairs},,{value},False,1234")
    lines.append(f"{common},recall,acc,,pairs,,,{sum(recall) / 2},True,1234")
    (folder / "eval" / "results.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "hybrids"
    root.mkdir()
    params = {"hybrid": ",".join(ROWS)}
    hydra_node = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
        "overrides": {"task": ["experiment=hybrids"]},
    }
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra_node}))
    for job, (attention, ppl, copy, recall) in RUNS.items():
        _write_run(root / f"{job}_{ROWS[job]}", job, attention, ppl, copy, recall)
    return root


def test_the_validations_before_fine_tuning_are_read_apart_from_it(sweep):
    runs = {r.job: r for r in load_runs(str(sweep))}
    dfw, softmax = runs[0], runs[5]
    assert (dfw.val_ppl_converted, dfw.val_ppl_transfer, dfw.val_ppl) == (500.0, 300.0, 100.0)
    assert (softmax.val_ppl_converted, softmax.val_ppl) == (80.0, 81.0)
    assert softmax.val_ppl_transfer != softmax.val_ppl_transfer  # nan: no transfer ran
    assert runs[3].status == "missing"


def test_the_hybrids_table_has_every_stage_the_share_retained_and_copy_and_recall(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out), "--table", "hybrids"]) == 0
    text = (out / "report.md").read_text()
    assert "## Hybrid conversions" in capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| variant | val ppl, converted"))
    assert header == (
        "| variant | val ppl, converted | val ppl, after transfer | val ppl, fine-tuned "
        "| retained, converted | retained, fine-tuned | copy acc, L = 8 | copy acc, L = 16 | recall acc |"
    )
    # The best softmax available: the teacher (the softmax row as converted, 80) beats it fine-tuned (81).
    assert _table_row(text, "DFW") == [
        "DFW",
        "500.00",
        "300.00",
        "100.00",
        "16.0%",
        "80.0%",
        "50.0%",
        "25.0%",
        "5.0%",
    ]
    assert _table_row(text, "DFW, window 8")[1:6] == ["150.00", "140.00", "90.00", "53.3%", "88.9%"]
    assert _table_row(text, "DFW, window 16")[6:] == ["100.0%", "75.0%", "25.0%"]
    layer = ["200.00", "150.00", "84.00", "40.0%", "95.2%", "100.0%", "100.0%", "50.0%"]
    assert _table_row(text, "DFW, softmax in layer 1") == ["DFW, softmax in layer 1", *layer]
    assert _table_row(text, "softmax")[1:6] == ["80.00", "—", "81.00", "100.0%", "98.8%"]
    table = text.split("## Hybrid conversions\n\n")[1].split("\n\n")[0].splitlines()
    variants = [line.split("|")[1].strip() for line in table[2:]]
    assert variants == [
        "DFW",
        "DFW, window 8",
        "DFW, window 16",
        "DFW, softmax in layer 1",
        "softmax",
    ]  # job order
    assert "job 3: missing" in text and "hybrid=dfw_window32" in text  # the job that never started
    assert "(80.00: the lower of the teacher" in text
    assert "| variant | state size m |" in text  # the runs table follows, its labels without the run names
    assert _table_row(text, "decay (softmax_layers=[1], window=None)")[2] == "200.00"


def test_without_a_softmax_run_the_shares_are_not_computed(sweep):
    import shutil

    shutil.rmtree(sweep / "5_softmax")
    text = hybrids.markdown([r for r in load_runs(str(sweep)) if r.status != "missing"])
    assert _table_row(text, "DFW")[4:6] == ["—", "—"] and "No finished softmax run" in text


def test_an_unknown_table_is_one_error(sweep, tmp_path):
    from dfw.errors import ConfigError

    with pytest.raises(
        ConfigError, match="--table nope: not a table of dfw.report; use one of runs, hybrids"
    ):
        report.report(str(sweep), tmp_path / "out", table="nope")
