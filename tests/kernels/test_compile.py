"""CPU CI compiles the kernel: the .cu translation units with nvcc for sm_75, sm_80 and sm_90.

dfw_scan.cu includes no torch header, so `nvcc -c` builds it on its own in seconds, with the macros
torch's extension builder passes (no implicit half/bfloat16 conversions). The binding, which includes
torch, is checked by the host compiler against the installed torch headers. The three compilations
run at once (~30 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "kernels" / "dfw_kernels" / "csrc"
ARCHS = ("sm_75", "sm_80", "sm_90")  # sm_75: the cp.async guard (no cp.async before sm_80) compiles
TORCH_EXTENSION_MACROS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
)


def _binding_command() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    command = ["c++", "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=dfw_kernels_scan", f"-I{CSRC}"]
    command += [f"-I{path}" for path in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return [*command, str(CSRC / "binding.cpp")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[int, str, Path | None]]:
    """Every compilation at once, one process each: {name: (return code, log, object file)}."""
    out = tmp_path_factory.mktemp("nvcc")
    commands = {}
    if NVCC is not None:
        for arch in ARCHS:
            obj = out / f"dfw_scan_{arch}.o"
            commands[arch] = (
                [
                    NVCC,
                    "-c",
                    "-std=c++17",
                    "-O3",
                    f"-arch={arch}",
                    "-Werror",
                    "all-warnings",
                    *TORCH_EXTENSION_MACROS,
                    str(CSRC / "dfw_scan.cu"),
                    "-o",
                    str(obj),
                ],
                obj,
            )
    if shutil.which("c++") is not None:
        commands["binding"] = (_binding_command(), None)
    processes = {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (command, _) in commands.items()
    }
    results = {}
    for name, process in processes.items():
        log, _ = process.communicate(timeout=600)
        results[name] = (process.returncode, log, commands[name][1])
    return results


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_compiles(compiled, arch):
    returncode, log, obj = compiled[arch]
    assert returncode == 0, f"nvcc -arch={arch} failed:\n{log}"
    assert obj.stat().st_size > 0


def test_kernel_sources_include_no_torch():
    for source in CSRC.glob("*.cu*"):
        text = source.read_text()
        for header in ("<torch", "<ATen", "<c10"):
            assert f"#include {header}" not in text, f"{source.name} includes {header}>"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler (c++) on PATH")
def test_binding_compiles_against_torch_headers(compiled):
    returncode, log, _ = compiled["binding"]
    assert returncode == 0, log[-5000:]
