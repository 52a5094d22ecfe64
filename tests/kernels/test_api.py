"""The public API on a machine without the CUDA kernel: fallbacks, errors, the decode step."""

from __future__ import annotations

import logging

import dfw_kernels
import pytest
import torch
from dfw_kernels import (
    cuda,
    decay_fast_weights,
    decay_fast_weights_step,
    recurrent_decay_fast_weights,
)
from dfw_kernels.closed_form import scan_reference
from dfw_kernels.testing import random_inputs, relative_rms_error


def test_import_registers_the_ops_without_building():
    assert hasattr(torch.ops.dfw_kernels, "scan") and hasattr(torch.ops.dfw_kernels, "step")
    assert dfw_kernels.cuda._extension is None  # importing never builds


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_falls_back_with_one_log_line(caplog):
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 1, 4, 4).items()}
    dfw_kernels.backend.forget()
    with caplog.at_level(logging.INFO, logger="dfw_kernels"):
        o_auto, _ = decay_fast_weights(**inputs, kernel="auto")
        decay_fast_weights(**inputs, kernel="auto")
    lines = [r.getMessage() for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert len(lines) == 1 and "cpu" in lines[0]
    o_torch, _ = decay_fast_weights(**inputs, kernel="torch")
    torch.testing.assert_close(o_auto, o_torch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cuda_kernel_fails_clearly_on_cpu():
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 1, 4, 4).items()}
    with pytest.raises(dfw_kernels.KernelUnavailable, match="kernel='cuda' cannot run: .*cpu"):
        decay_fast_weights(**inputs, kernel="cuda")
    with pytest.raises(dfw_kernels.KernelUnavailable, match="kernel='cuda' cannot run: .*cpu"):
        decay_fast_weights_step(
            *(inputs[n][:, 0] for n in ("q", "k", "v")), None, None, torch.zeros(1, 1, 4, 4), kernel="cuda"
        )
    with pytest.raises(ValueError, match="kernel must be one of"):
        decay_fast_weights(**inputs, kernel="nope")


def test_unavailable_reason_is_none_or_a_sentence():
    for kernel in ("cuda", "triton"):
        reason = dfw_kernels.unavailable_reason(kernel)
        if not torch.cuda.is_available() and kernel == "cuda":
            assert reason is not None  # the kernel cannot run without a GPU
        assert reason is None or (isinstance(reason, str) and len(reason) > 10)
    assert dfw_kernels.unavailable_reason("torch") is None
    assert dfw_kernels.unavailable_reason("auto", "cpu") is None
    reason = dfw_kernels.unavailable_reason("cuda", "cpu")
    assert reason.startswith("the CUDA kernel runs CUDA tensors, not cpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        dfw_kernels.unavailable_reason("cuda-graph")


def test_the_backend_is_resolved_once_per_device_dtype_and_sizes(monkeypatch):
    """Every layer and token used to re-decide (and re-validate) which implementation runs."""
    decisions = []
    decide = dfw_kernels.backend._decide
    monkeypatch.setattr(dfw_kernels.backend, "_decide", lambda *args: decisions.append(args) or decide(*args))
    dfw_kernels.backend.forget()
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 2, 4, 6).items()}
    for _ in range(3):  # three layers, say
        decay_fast_weights(**inputs, kernel="auto")
        for t in range(4):
            decay_fast_weights_step(
                *(inputs[n][:, t] for n in ("q", "k", "v")),
                None,
                None,
                inputs["initial_state"].clone(),
                kernel="auto",
            )
    decay_fast_weights(**{n: x.float() for n, x in inputs.items()}, kernel="auto")  # another dtype
    assert [(d[0], d[2], d[5]) for d in decisions] == [
        ("auto", torch.float64, False),
        ("auto", torch.float64, True),
        ("auto", torch.float32, False),
    ]
    dfw_kernels.backend.forget()


def test_the_backend_resolves_inside_torch_compile_without_a_graph_break(caplog):
    """The decision (its log line, the CUDA build) stays out of the traced graph: a constant for Dynamo."""
    dfw_kernels.backend.forget()

    def scaled(x):
        implementation = dfw_kernels.backend.resolve("auto", x.device, x.dtype, 4, 4)
        return x * (2 if implementation == "cuda" else 3)

    compiled = torch.compile(scaled, fullgraph=True, backend="eager")
    x = torch.ones(3)
    with caplog.at_level(logging.INFO, logger="dfw_kernels"):
        expected = scaled(x)
        dfw_kernels.backend.forget()  # decide again, this time while Dynamo traces
        torch.testing.assert_close(compiled(x), expected)
    torch._dynamo.reset()
    dfw_kernels.backend.forget()


@pytest.mark.parametrize("shape", ["[B, H, D]", "[B, 1, H, D]"])
def test_decode_steps_match_the_loop(shape):
    """Prefill with the chunked form, then decode token by token: the same outputs as one loop."""
    inputs = {n: x.detach() for n, x in random_inputs(2, 12, 3, 5, 6).items()}
    o_ref, final_ref = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    split = {n: x[:, :7] for n, x in inputs.items() if n != "initial_state"}
    o, state = decay_fast_weights(**split, initial_state=inputs["initial_state"], output_final_state=True)
    outputs = [o]
    for t in range(7, 12):
        token = {n: inputs[n][:, t] if shape == "[B, H, D]" else inputs[n][:, t : t + 1] for n in split}
        o_t = decay_fast_weights_step(**token, state=state)
        outputs.append(o_t.unsqueeze(1) if shape == "[B, H, D]" else o_t)
    assert relative_rms_error(torch.cat(outputs, dim=1), o_ref) < 1e-12
    assert relative_rms_error(state, final_ref) < 1e-12


def test_scalar_gates_and_odd_sizes_through_the_public_api():
    inputs = random_inputs(1, 9, 2, 5, 7)
    inputs["log_key_gate"] = inputs["log_key_gate"][..., :1].detach().requires_grad_()
    o, final = decay_fast_weights(**inputs, output_final_state=True, kernel="torch")
    o_ref, final_ref = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    assert relative_rms_error(o, o_ref) < 1e-12 and relative_rms_error(final, final_ref) < 1e-12


class _BindingOnCPU:
    """Stands in for the compiled scan: checks what binding.cpp checks, computes with scan_reference."""

    def __init__(self):
        self.calls = 0

    def check(self, q, k, v, *float32_inputs, x2=None):
        for x in (q, k, v, x2, *float32_inputs):
            assert x is None or (x.is_contiguous() and x.data_ptr() % 16 == 0)
        assert q.dtype == k.dtype == v.dtype and q.dtype in cuda.DTYPES
        assert x2 is None or x2.dtype == q.dtype
        assert all(x is None or x.dtype == torch.float32 for x in float32_inputs)
        assert q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0, "the kernel takes multiples of 8"
        self.calls += 1

    def scan(self, q, k, v, gk, gv, s0, x1, x2, start, reverse, output, output_pre, final, final_pre):
        q, k, v, gk, gv, x1, x2 = (cuda._aligned(x) for x in (q, k, v, gk, gv, x1, x2))  # as the op does
        self.check(q, k, v, gk, gv, x1, x2=x2)
        r = scan_reference(
            q,
            k,
            v,
            gk,
            gv,
            s0,
            reverse=reverse,
            out_dtype=q.dtype if output else None,
            output_pre=output_pre,
            output_final_state=final,
            output_final_pre_state=final_pre,
            gate_grad_inputs=None if x1 is None else (x1, x2, start),
        )
        return tuple(x if x is not None else q.new_empty(0) for x in r)

    def step(self, q, k, v, gk, gv, state):
        q, k, v, gk, gv = (cuda._aligned(x) for x in (q, k, v, gk, gv))  # as the op does
        self.check(q, k, v, gk, gv)
        assert state.dtype == torch.float32 and state.shape[-2:] == (q.shape[-1], v.shape[-1])
        r = scan_reference(q, k, v, gk, gv, state, out_dtype=q.dtype, output_final_state=True)
        state.copy_(r.final_state)
        return r.out


@pytest.fixture
def binding_on_cpu(monkeypatch):
    fake = _BindingOnCPU()
    monkeypatch.setattr(cuda, "load_extension", lambda verbose=False: None)
    monkeypatch.setattr(cuda, "scan_op", fake.scan)
    monkeypatch.setattr(cuda, "step_op", fake.step)
    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_path_python_side_on_cpu(binding_on_cpu, dtype):
    """cuda.decay_fast_weights_cuda up to the binding: padding to multiples of 8, scalar gates, casts,
    the state in float32, the op's arguments and results; every gradient against the float64 loop."""
    inputs = random_inputs(2, 21, 2, 5, 7, dtype=dtype)
    inputs["log_value_gate"] = inputs["log_value_gate"][..., :1].detach().requires_grad_()  # one per head
    leaves = list(inputs.values())
    ref_inputs = {n: x.detach().double().requires_grad_() for n, x in inputs.items()}
    g = torch.Generator().manual_seed(5)
    do = torch.randn(2, 21, 2, 7, generator=g, dtype=torch.float64)
    d_final = torch.randn(2, 2, 5, 7, generator=g, dtype=torch.float64)
    o_ref, final_ref = recurrent_decay_fast_weights(**ref_inputs, output_final_state=True)
    expected = torch.autograd.grad(
        [o_ref, final_ref], list(ref_inputs.values()), [do.to(dtype).double(), d_final]
    )
    o, final = cuda.decay_fast_weights_cuda(*leaves, output_final_state=True)
    actual = torch.autograd.grad([o, final], leaves, [do.to(dtype), d_final.float()])
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert o.dtype == dtype and o.shape == o_ref.shape and final.shape == final_ref.shape
    assert relative_rms_error(o, o_ref) < tol and relative_rms_error(final, final_ref) < 1e-5
    for name, a, e in zip(inputs, actual, expected, strict=True):
        assert a.shape == e.shape and relative_rms_error(a, e) < tol, f"d{name}"
    assert binding_on_cpu.calls == 4  # one scan forward, three backward


@pytest.mark.parametrize("K, V", [(8, 16), (64, 65), (20, 64)], ids=["aligned", "V=D+1", "K=20"])
def test_cuda_step_python_side_on_cpu(binding_on_cpu, K, V):
    """The step pads sizes that are not multiples of 8 (V = D + 1 of the denominator presets)."""
    inputs = {n: x.detach().float() for n, x in random_inputs(2, 3, 2, K, V).items()}
    state, expected_state = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    token = [inputs[n][:, 0] for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]  # [B, H, D]
    o = cuda.decay_fast_weights_step_cuda(*(x.unsqueeze(1) for x in token), state)
    o_expected = dfw_kernels._torch_step(*(x.unsqueeze(1) for x in token), expected_state)
    assert relative_rms_error(o, o_expected) < 1e-6 and relative_rms_error(state, expected_state) < 1e-6
