"""`debug=fast` and `debug=overfit` run as their names say: offline, on CPU, standalone, through the real
CLI."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfw.data.corpora import load_corpus
from dfw.train import train
from tests.conftest import REPO, compose


def _offline_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m dfw.train ...` with no hub, no W&B servers, no pip index, and an empty cache."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PIP_NO_INDEX": "1",
        "DFW_CACHE": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "dfw.train", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _metrics(run: Path) -> dict[str, list[float]]:
    """Every logged value of each metric in <run>/csv/metrics.csv, in order."""
    with open(run / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) for row in rows if row[key]] for key in rows[0]}


@pytest.mark.parametrize("mode", ["fast", "overfit"])
def test_debug_configs_are_tiny_offline_and_standalone(mode, tmp_path):
    cfg = compose(f"debug={mode}")
    assert (cfg.model.name, cfg.data.corpus, cfg.trainer.accelerator, cfg.export_dir) == (
        "tiny",
        "tiny",
        "cpu",
        None,
    )
    assert set(cfg.logger) == {"csv"}
    assert cfg.trainer.max_steps <= 200
    assert (
        compose(f"debug={mode}", "attention=softmax", "model=gpt2").model.name == "gpt2"
    )  # the command line wins
    corpus = load_corpus(cfg.data.corpus, None, tmp_path)  # written in the code: nothing to read or download
    assert all(next(corpus.documents(split)) for split in ("train", "validation", "test"))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_debug_fast_trains_and_writes_metrics_offline(tmp_path):
    result = _offline_cli(tmp_path, "debug=fast")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    metrics = _metrics(run)
    assert len(metrics["train/loss"]) == 5 and all(math.isfinite(v) for v in metrics["train/loss"])
    assert (
        len(metrics["val/ppl"]) == 2 and len(metrics["test/ppl"]) == 1
    )  # at conversion, after step 5; the test
    assert metrics["model/state_size"] == [32.0]  # decay at m = the tiny model's head size (64 / 2 heads)
    assert not (run / "model").exists() and not (run / "wandb").exists()  # no export, no W&B


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_down(tmp_path, monkeypatch):
    """The first 40 of its 200 steps, in this process: the loss on the two batches falls steadily."""
    monkeypatch.setenv("DFW_CACHE", str(tmp_path / "cache"))
    first_40 = [
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "module.scheduler.num_training_steps=200",
    ]
    cfg = compose("debug=overfit", *first_40, f"paths.output_dir={tmp_path / 'run'}")
    train(cfg)
    losses = _metrics(tmp_path / "run")["train/loss"]
    assert len(losses) == 20 and losses[0] > 10  # ln(50257) = 10.8 at the start
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < min(losses[:10])
