"""`python -m dfw.bench decode` on CPU at toy sizes: it runs, prints its table, writes its plot, and the
memory it reports is the KV cache (growing) for softmax, the fixed-size state for dfw, and both for dfw
with one softmax layer (its one layer's KV cache grows, the converted layer's state does not)."""

from __future__ import annotations

import torch

from dfw.bench import decode


def test_decode_benchmark_reports_growing_kv_cache_and_constant_state(tmp_path, capsys):
    size = decode.Size(
        2, 2, 64, torch.float32, contexts=(16, 48), batch_sizes=(1, 2), prefill_chunk=16, steps=2, warmup=1
    )
    rows, notes = decode.run(size, torch.device("cpu"), graphs=True)
    assert {r.model for r in rows} == {"softmax", "dfw", decode.HYBRID}  # no graph rows without a GPU
    assert all(r.ms_per_token > 0 for r in rows)
    state = {(r.model, r.batch, r.context): r.state_bytes for r in rows}
    kv_per_token = 2 * 2 * 64 * 4  # keys and values, 2 layers, width 64, float32
    dfw_per_sequence = (
        2 * 2 * 32 * 32 * 4
    )  # 2 layers, 2 heads, state m = head size = 32, x head size 32, float32
    for batch in (1, 2):
        assert state["softmax", batch, 16] == batch * 16 * kv_per_token
        assert state["softmax", batch, 48] == batch * 48 * kv_per_token
        assert state["dfw", batch, 16] == state["dfw", batch, 48] == batch * dfw_per_sequence
        for context in (16, 48):  # layer 0 converted (its state), layer 1 softmax (its KV cache)
            expected = batch * (dfw_per_sequence + context * kv_per_token) // 2
            assert state[decode.HYBRID, batch, context] == expected
    assert "learned positions" in notes[0]
    assert f"{decode.HYBRID}: softmax kept in layer 1 of 2, the others converted" in notes

    plot = tmp_path / "decode.png"
    argv = "--size cpu --contexts 8 24 --batch-sizes 1 --steps 2 --warmup 1".split() + ["--plot", str(plot)]
    assert decode.main(argv) == 0
    out = capsys.readouterr().out
    assert plot.stat().st_size > 0
    assert "ms/token" in out and "state constant" in out and "state grows" in out
    summary = [line for line in out.splitlines() if line.startswith(f"{decode.HYBRID} batch   1:")]
    assert len(summary) == 1 and "state grows" in summary[0]  # its one softmax layer's KV cache
