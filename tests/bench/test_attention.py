"""`python -m dfw.bench attention` runs on CPU and prints one row per preset."""

from __future__ import annotations

import json

from dfw.bench.__main__ import main


def test_attention_bench_prints_a_row_per_preset(capsys, tmp_path):
    argv = [
        "attention",
        "--shape",
        "tiny",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--presets",
        "softmax,delta,decay,decay+window=16",
    ]
    assert main([*argv, "--json", str(tmp_path / "attention.json")]) == 0
    printed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"softmax", "delta", "decay", "decay+window=16"} <= printed
    rows = {
        r["preset"]: r for r in json.loads((tmp_path / "attention.json").read_text())["tables"][0]["rows"]
    }
    # State per sequence, 2 layers, T = 64, fp32: softmax's KV cache, 2 layers * (k, v) * 64 tokens * 2 heads
    # * 16 * 4 B = 32 KiB; decay's fixed state, 2 layers * 2 heads * 16 * 16 * 4 B = 4 KiB.
    assert rows["softmax"]["state/seq"] == "32.0 KiB"
    assert rows["decay"]["state/seq"] == "4.0 KiB"
    # With a 16-token window, its ring buffer too: 2 layers * 16 tokens * 2 heads * (16 + 16 + 16) * 4 B
    # = 12 KiB, and a counter (8 B per layer).
    assert rows["decay+window=16"]["state/seq"] == "16.0 KiB"
    assert all(r["tokens/s"] > 0 and r["step ms"]["median_ms"] > 0 for r in rows.values())
    # Issue 11's two ratios, decay over softmax: tokens/s and the activations saved for the backward.
    (note,) = [
        n
        for n in json.loads((tmp_path / "attention.json").read_text())["tables"][0]["notes"]
        if "ratios" in n
    ]
    ratio = rows["decay"]["tokens/s"] / rows["softmax"]["tokens/s"]
    assert note.startswith(f"ratios decay/softmax: tokens/s {ratio:.2f}x, saved for backward ")
    notes = json.loads((tmp_path / "attention.json").read_text())["tables"][0]["notes"]
    assert any(n.startswith("ratio decay+window=16/decay: step time ") for n in notes)
