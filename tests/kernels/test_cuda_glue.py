"""The Python side of the CUDA path on any machine: T = 0, the build retry, one log line per fallback."""

from __future__ import annotations

import logging

import dfw_kernels
import pytest
import torch
from dfw_kernels import chunk_decay_fast_weights, cuda, decay_fast_weights_step
from dfw_kernels.testing import random_inputs


def test_step_fallback_is_logged_once(monkeypatch, caplog):
    """A CUDA machine (faked) decoding with a float64 state: PyTorch runs the step, said once."""
    monkeypatch.setattr(dfw_kernels.backend, "_cuda_reason", lambda device: None)
    monkeypatch.setattr(cuda, "load_extension", lambda: None)
    dfw_kernels.backend.forget()
    x = {n: t.detach() for n, t in random_inputs(1, 4, 2, 8, 8, dtype=torch.float32).items()}
    state = x["initial_state"].double()
    with caplog.at_level(logging.INFO, logger="dfw_kernels"):
        for t in range(4):  # every token of every layer used to log a warning
            token = [x[n][:, t] for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]
            decay_fast_weights_step(*token, state, kernel="auto")
        with pytest.raises(dfw_kernels.KernelUnavailable, match="float32 state in place, got torch.float64"):
            decay_fast_weights_step(*token, state, kernel="cuda")
    assert len([r for r in caplog.records if "float32 state" in r.getMessage()]) == 1
    dfw_kernels.backend.forget()


def test_no_tokens_gives_an_empty_output_and_the_initial_state():
    inputs = random_inputs(2, 0, 3, 8, 5)
    o, final = chunk_decay_fast_weights(**inputs, output_final_state=True)
    assert o.shape == (2, 0, 3, 5)
    torch.testing.assert_close(final, inputs["initial_state"], rtol=0, atol=0)
    (grad,) = torch.autograd.grad(final.sum(), inputs["initial_state"])
    torch.testing.assert_close(grad, torch.ones_like(grad))
    no_state = {**inputs, "initial_state": None}
    o, final = chunk_decay_fast_weights(**no_state, output_final_state=True)
    assert final.abs().sum() == 0 and final.shape == (2, 3, 8, 5)


def test_failed_build_is_retried_once_then_kept_until_cleared(monkeypatch):
    import torch.utils.cpp_extension

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    monkeypatch.setattr(cuda, "_extension", None)
    monkeypatch.setattr(cuda, "_build_error", None)
    monkeypatch.setattr(cuda, "_build_attempts", 0)
    for _ in range(3):
        with pytest.raises(cuda.KernelUnavailable, match="Ninja is required"):
            cuda.load_extension()
    assert len(calls) == cuda.MAX_BUILD_ATTEMPTS  # tried once more, then the error is kept
    with pytest.raises(cuda.KernelUnavailable, match="clear_build_error"):
        cuda.load_extension()
    cuda.clear_build_error()
    with pytest.raises(cuda.KernelUnavailable):
        cuda.load_extension()
    assert len(calls) == cuda.MAX_BUILD_ATTEMPTS + 1
