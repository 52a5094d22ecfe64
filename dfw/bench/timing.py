"""The benchmarks' one way to time, summarise and print: medians with their spread, aligned tables, JSON.

Timing. `time_ms(fn, device, warmup, reps)` runs fn `warmup` times untimed, then `reps` times:
  CUDA  each call between two CUDA events on the current stream (GPU time of what fn enqueued, the
        host's launch overhead included when the GPU waits on it), one synchronisation per call;
  CPU   each call between two time.perf_counter() readings. (Not torch.utils.benchmark.Timer: its
        timeit() runs the statement twice more to warm up on every measurement, and the steps timed
        here change state, a decode step's cache or an optimizer's weights, and cost seconds.)
Per-call samples go into a `Timing`: the median and the interquartile range (IQR), both in ms.
Measurements driven from elsewhere (a Lightning training loop) come in as samples: `Timing.of(ms)`.

Tables. `Table(title, columns)` collects rows of plain values and prints them aligned, one format
for every benchmark: numbers right-aligned with thousands separators, a `Timing` as "median ±IQR/2",
None as "-", and notes under the table. `write_json(path, ...)` stores every number of a run
(Timing as {median_ms, iqr_ms, reps}), so the GPU check can keep what it measured.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float  # interquartile range of the samples: the spread
    reps: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        samples = sorted(samples_ms)
        if not samples:
            raise ValueError("a Timing needs at least one sample")
        if len(samples) < 2:
            return cls(samples[0], 0.0, 1)
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), q3 - q1, len(samples))

    def __str__(self) -> str:
        return f"{_number(self.median_ms)} ±{_number(self.iqr_ms / 2)}"


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int, reps: int) -> Timing:
    """Median and spread of fn()'s time in ms over `reps` calls after `warmup` untimed calls."""
    device = torch.device(device)
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return Timing.of(samples)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return Timing.of(samples)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the numbers were measured on: device, torch and CUDA versions."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _number(x: float) -> str:
    """Three significant digits, never in exponent notation: 12,345 / 123.4 / 12.3 / 0.0123."""
    if x != x:
        return "nan"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Timing):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _number(value)
    return str(value)


@dataclass
class Table:
    """Rows of {column: value}; printed aligned; `.rows` and `.notes` go to JSON as they are."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> dict[str, Any]:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.title}: no column {sorted(unknown)}")
        self.rows.append(row)
        return row

    def lines(self) -> list[str]:
        cells = [[_cell(row.get(c)) for c in self.columns] for row in self.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(self.columns)]
        # Text columns (names, notes) are left-aligned, numbers right-aligned.
        text = [all(isinstance(r.get(c), str | None) for r in self.rows) for c in self.columns]
        align = lambda i, cell: cell.ljust(widths[i]) if text[i] else cell.rjust(widths[i])
        header = "  ".join(align(i, c) for i, c in enumerate(self.columns))
        out = [self.title, header, "-" * len(header)]
        out += ["  ".join(align(i, text) for i, text in enumerate(r)) for r in cells]
        return out + self.notes

    def print(self) -> None:
        print("\n" + "\n".join(self.lines()), flush=True)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def _json_default(value: Any) -> Any:
    if isinstance(value, Timing):
        return asdict(value)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(
    path: Path | str | None, benchmark: str, device: torch.device | str, tables: Sequence[Table], **extra: Any
) -> None:
    """Every number of one benchmark run, with the environment, at `path` (nothing when path is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": benchmark, **environment(device), "tables": [t.to_json() for t in tables], **extra}
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    print(f"numbers: {path}")
