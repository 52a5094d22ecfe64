"""The GPU check's reports (kernels/gpu_check.sh runs this after every stage; the standard library only,
except `env`, which asks torch):

    python kernels/gpu_check_report.py env ENV_JSON              the machine: GPU, driver, torch, CUDA, Triton
    python kernels/gpu_check_report.py summary WORK OUT "STAGES"  OUT/{summary.json,results.md,details.tar.gz}
    python kernels/gpu_check_report.py print OUT                  results.md to stdout

summary.json: each selected stage's status (pending, running, passed, failed, timeout, skipped), exit
code, seconds and limit; the test counts and failures from the junit XML; and every number the stages
wrote (the benchmarks' JSON tables, the AOT report, the demo's table). results.md: the same as tables.
details.tar.gz: WORK as it is (logs, JSON, XML, the decode plot, the demo's run folders without
checkpoints or weights), at most 15 MiB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MAX_DETAILS_BYTES = 15 * 2**20  # the device machine returns files of up to 16 MiB
HEAVY_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".npy", ".arrow")


def env(path: str) -> int:
    import platform

    import torch

    on_gpu = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "capability": "{}.{}".format(*torch.cuda.get_device_capability()) if on_gpu else None,
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for tool, args in (
        ("nvcc", ["--version"]),
        ("nvidia-smi", ["--query-gpu=driver_version,memory.total", "--format=csv,noheader"]),
    ):
        found = shutil.which(tool)
        output = subprocess.run([found, *args], capture_output=True, text=True).stdout if found else ""
        info[tool] = (output.strip().splitlines() or [None])[-1]
    info["ninja"] = shutil.which("ninja")
    Path(path).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0


def _stages(work: Path, selected: list[str]) -> list[dict]:
    recorded = {}
    status_file = work / "stages.tsv"
    lines = status_file.read_text().splitlines() if status_file.is_file() else []
    for line in lines:
        name, status, code, seconds, limit = (line.split("\t") + [""] * 5)[:5]
        recorded[name] = {
            "stage": name,
            "status": status,
            "exit_code": int(code) if code else None,
            "seconds": int(seconds or 0),
            "limit_seconds": int(limit) if limit else None,
        }
    return [recorded.get(name, {"stage": name, "status": "pending"}) for name in selected]


def _tests(xml: Path) -> dict | None:
    if not xml.is_file():
        return None
    try:
        root = ElementTree.parse(xml).getroot()
    except ElementTree.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in keys}
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def _demo_table(work: Path) -> list[str] | None:
    results = sorted(work.glob("demo/outputs/demo/*/results.md"))
    if results:
        return [line for line in results[-1].read_text().splitlines() if line.startswith("|")]
    return None


def _collect(work: Path, selected: list[str]) -> dict:
    summary: dict = {"stages": _stages(work, selected)}
    for name in ("env", "aot", "kernel", "decode", "train"):
        path = work / f"{name}.json"
        if path.is_file():
            try:
                summary[name] = json.loads(path.read_text())
            except json.JSONDecodeError:
                summary[name] = {"error": f"{path.name} is not valid JSON (the stage was cut short?)"}
    tests = _tests(work / "tests.xml")
    if tests is not None:
        summary["tests"] = tests
    demo = _demo_table(work)
    if demo is not None:
        summary["demo_table"] = demo
    return summary


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and "median_ms" in value:  # a Timing: median ±IQR/2
        return f"{value['median_ms']:.4g} ±{value['iqr_ms'] / 2:.2g}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "/")


def _table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]


def _markdown(summary: dict) -> str:
    out = ["# GPU check", ""]
    if "env" in summary:
        env = summary["env"]
        out += [", ".join(f"{k}: {v}" for k, v in env.items() if k != "executable"), ""]
    out += ["## Stages", ""]
    out += _table(["stage", "status", "exit_code", "seconds", "limit_seconds"], summary["stages"]) + [""]
    if "tests" in summary:
        tests = summary["tests"]
        columns = ["tests", "failures", "errors", "skipped", "seconds"]
        out += ["## Tests", ""] + _table(columns, [tests]) + [""]
        out += [f"- failed: `{name}`" for name in tests["failed"]] + ([""] if tests["failed"] else [])
    if isinstance(summary.get("aot"), list):
        rows = summary["aot"]
        out += ["## Triton kernels, ahead of time (ptxas)", ""] + _table(list(rows[0]), rows) + [""]
    for name in ("kernel", "decode", "train"):
        record = summary.get(name)
        if not isinstance(record, dict) or "tables" not in record:
            continue
        where = f"{record.get('device')}, torch {record.get('torch')}, CUDA {record.get('cuda')}"
        out += [f"## {name} ({where})", ""]
        for table in record["tables"]:
            out += [f"**{table['title']}**", ""] + _table(table["columns"], table["rows"]) + [""]
            out += [f"- {note}" for note in table.get("notes", [])] + [""]
    if "demo_table" in summary:
        out += ["## Demo", ""] + summary["demo_table"] + [""]
    return "\n".join(out)


def _details(work: Path, target: Path) -> None:
    """WORK as a tarball, without checkpoints and weights; the largest files go first if it is too big."""
    files = [p for p in sorted(work.rglob("*")) if p.is_file() and not p.name.endswith(HEAVY_SUFFIXES)]
    files = [p for p in files if "checkpoints" not in p.parts]
    budget, kept = MAX_DETAILS_BYTES, []
    for path in sorted(files, key=lambda p: p.stat().st_size):
        size = path.stat().st_size
        if size <= budget:
            kept.append(path)
            budget -= size
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        for path in sorted(kept):
            archive.add(path, arcname=str(Path("details") / path.relative_to(work)))
    partial.replace(target)  # whole or not at all, also when the command is killed meanwhile


def summary(work: str, out: str, stages: str) -> int:
    work_dir, out_dir = Path(work), Path(out)
    record = _collect(work_dir, stages.split())
    reports = {"summary.json": json.dumps(record, indent=2) + "\n", "results.md": _markdown(record)}
    for name, text in reports.items():
        partial = out_dir / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out_dir / name)
    _details(work_dir, out_dir / "details.tar.gz")
    return 0


def print_results(out: str) -> int:
    text = (Path(out) / "results.md").read_text()
    print(re.sub(r"\n{3,}", "\n\n", text))
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"env": env, "summary": summary, "print": print_results}[command](*args))
