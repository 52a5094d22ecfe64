"""`python -m dfw.bench attention` runs on CPU and prints one row per preset."""

from __future__ import annotations

from dfw.bench.__main__ import main


def test_attention_bench_prints_a_row_per_preset(capsys):
    assert main(["attention", "--shape", "tiny", "--warmup", "0", "--repeats", "1", "--presets", "softmax,delta,decay"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"softmax", "delta", "decay"} <= set(rows)
    # State per sequence, 2 layers, T = 64, fp32: softmax's KV cache, 2 layers * (k, v) * 64 tokens * 2 heads
    # * 16 * 4 B = 32 KiB; decay's fixed state, 2 layers * 2 heads * 16 * 16 * 4 B = 4 KiB.
    assert rows["softmax"][4:6] == ["32.0", "KiB"]
    assert rows["decay"][4:6] == ["4.0", "KiB"]
    # Issue 11's two ratios, decay over softmax: tokens/s and the activations saved for the backward.
    assert rows["ratios"][:3] == ["ratios", "decay/softmax:", "tokens/s"] and rows["ratios"][-1].endswith("x")
    tokens_per_s = {name: float(rows[name][1].replace(",", "")) for name in ("decay", "softmax")}
    ratio = tokens_per_s["decay"] / tokens_per_s["softmax"]
    assert abs(float(rows["ratios"][3].rstrip("x,")) - ratio) <= 0.006 + 1e-3 * ratio
