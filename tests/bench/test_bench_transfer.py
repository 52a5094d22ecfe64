"""`python -m dfw.bench transfer`: a fine-tuning and a transfer step timed on the same tiny model."""

from __future__ import annotations

import json

from dfw.bench.transfer import main


def test_bench_transfer_times_both_steps_and_skips_presets_with_nothing_to_learn(tmp_path, capsys):
    out = tmp_path / "transfer.json"
    assert (
        main(
            [
                "--shape",
                "tiny",
                "--presets",
                "decay,linear",
                "--warmup",
                "0",
                "--repeats",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = {row["preset"]: row for row in json.loads(out.read_text())["tables"][0]["rows"]}
    assert rows["decay"]["fine-tune ms"]["median_ms"] > 0 and rows["decay"]["transfer ms"]["reps"] == 2
    assert rows["decay"]["transfer / fine-tune"] > 0
    assert rows["linear"]["transfer ms"] is None  # elu features: no parameters, no transfer step
    assert "transfer / fine-tune" in capsys.readouterr().out
