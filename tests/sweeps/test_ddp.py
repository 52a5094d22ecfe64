"""trainer=ddp through the real entry point: two CPU processes (gloo) train, checkpoint and test one model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from tests.conftest import run_module, tiny_overrides


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(tmp_path, text_files):
    overrides = [
        o for o in tiny_overrides(tmp_path, text_files, "attention=decay") if not o.startswith("trainer=")
    ]
    result = run_module(
        "dfw.train",
        *overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "export_dir=null",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # Lightning started the second process itself and joined both with gloo.
    assert "MEMBER: 2/2" in output and "distributed_backend=gloo" in output
    checkpoint = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["global_step"] == 4
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    # Rank 0 logs: 4 blocks per step on this rank (data.batch_size is per device), and a finite test
    # perplexity.
    assert metrics["train/samples"].dropna().iloc[0] == 4
    assert math.isfinite(metrics["test/ppl"].dropna().iloc[-1])
