"""`attention.kernel` is checked when the model is built: a kernel that cannot run here is one `error:` line
and exit code 2, not a traceback from inside the kernel at the first forward pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dfw.errors import ConfigError
from dfw.model import core_factory
from tests.conftest import CONF, OFFLINE_ENV, REPO, tiny_overrides


def _decay_core(kernel: str):
    node = OmegaConf.load(CONF / "attention" / "decay.yaml")
    node.kernel = kernel
    return core_factory(node)(hidden_size=32, num_heads=2, head_dim=16, layer_idx=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (the GPU machine runs the kernel)")
def test_triton_on_cpu_without_the_interpreter_is_refused_when_the_core_is_built(monkeypatch):
    import dfw_kernels.backend

    monkeypatch.setattr(dfw_kernels.backend, "triton_interpreting", lambda: False)
    with pytest.raises(ConfigError, match="attention.kernel=triton cannot run here: .*TRITON_INTERPRET=1"):
        _decay_core("triton")
    with pytest.raises(ConfigError, match="attention.kernel=cuda cannot run here"):
        _decay_core("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (the GPU machine runs the kernel)")
def test_triton_in_the_interpreter_is_accepted():
    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py, on a machine without a GPU
    core = _decay_core("triton")
    assert core.kernel == "triton"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (the GPU machine runs the kernel)")
def test_cli_with_a_kernel_that_cannot_run_here_is_one_error_line_and_exit_2(tmp_path, text_files):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    overrides = tiny_overrides(tmp_path, text_files, "attention=decay", "attention.kernel=triton")
    run = subprocess.run(
        [sys.executable, "-m", "dfw.train", *overrides, f"hydra.run.dir={tmp_path}/hydra"],
        cwd=REPO,
        env={**env, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "error: attention.kernel=triton cannot run here" in errors[0], output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "checkpoints").exists()
