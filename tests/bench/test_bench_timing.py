"""The benchmarks' timing helper: the statistics are right, the CPU path times what it is given, and
tables print every row and go to JSON with every number."""

from __future__ import annotations

import json
import time

import pytest

from dfw.bench.timing import Table, Timing, time_ms, write_json


def test_timing_of_samples_gives_median_and_interquartile_range():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.iqr_ms, t.reps) == (3.0, 2.0, 5)  # quartiles 2 and 4
    assert Timing.of([7.0]) == Timing(7.0, 0.0, 1)
    with pytest.raises(ValueError):
        Timing.of([])


def test_time_ms_on_cpu_measures_the_call():
    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    t = time_ms(sleep_2ms, "cpu", warmup=2, reps=5)
    assert len(calls) == 7 and t.reps == 5
    assert 1.9 < t.median_ms < 50  # sleep() never returns early; the machine may be slow


def test_table_prints_aligned_rows_and_writes_every_number(tmp_path, capsys):
    table = Table("title", ["name", "tokens/s", "step ms", "note"])
    table.add(name="a", **{"tokens/s": 12345.6, "step ms": Timing(1.5, 0.2, 3)})
    table.add(name="bb", note="needs an NVIDIA GPU")
    table.notes.append("a note")
    with pytest.raises(KeyError):
        table.add(nme="typo")
    table.print()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "title" and lines[-1] == "a note"
    assert "12,346" in lines[3] and "1.5 ±0.1" in lines[3] and "needs an NVIDIA GPU" in lines[4]
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned
    write_json(tmp_path / "x.json", "test", "cpu", [table], extra=1)
    record = json.loads((tmp_path / "x.json").read_text())
    assert record["extra"] == 1 and record["torch"] and record["device"].startswith("CPU")
    assert record["tables"][0]["rows"][0]["step ms"] == {"median_ms": 1.5, "iqr_ms": 0.2, "reps": 3}
