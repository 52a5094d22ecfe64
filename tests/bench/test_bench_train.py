"""`python -m dfw.bench train --size cpu`: the real LightningModule and optimizer train a tiny GPT-2 with
softmax and with decay (PyTorch reference), and the table has a throughput for both."""

from __future__ import annotations

import json

import pytest

from dfw.bench.__main__ import main


@pytest.mark.slow
def test_train_bench_measures_softmax_and_decay_on_cpu(tmp_path, capsys):
    assert (
        main(["train", "--size", "cpu", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "t.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "training throughput" in out and "decay, torch reference" in out
    rows = {r["variant"]: r for r in json.loads((tmp_path / "t.json").read_text())["tables"][0]["rows"]}
    for name in ("softmax (sdpa)", "decay, torch reference"):
        assert rows[name]["tokens/s"] > 0 and rows[name]["step ms"]["reps"] == 2, rows[name]
    assert rows["softmax (sdpa)"]["vs softmax"] == 1.0
    assert rows["decay, cuda kernel"]["note"] == "needs an NVIDIA GPU"  # a row with its reason, not a crash
