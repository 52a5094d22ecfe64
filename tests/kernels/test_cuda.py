"""The CUDA kernel against the float64 reference (run on a machine with an NVIDIA GPU).

Outputs, final state and every gradient, the initial state's included; relative RMS error < 1e-5 in
float32 and < 5e-3 in bfloat16 (float16: 2e-3); T not a multiple of any tile (the kernel's chunks are
16 or 32 steps), D in {32, 64, 128}, gates near 0, near 1 and mixed. Every output buffer is NaN-filled
before the kernel runs (cuda.POISON_OUTPUTS), so an element the kernel forgets cannot pass.
Run with `kernels/gpu_check.sh` (or `pytest -m gpu tests/kernels`).
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels import chunk_decay_fast_weights, cuda, decay_fast_weights, decay_fast_weights_step
from dfw_kernels.closed_form import scan_reference
from dfw_kernels.testing import random_inputs, relative_rms_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
    ),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}
SHAPES = [  # (B, T, H, K, V)
    (2, 1, 3, 32, 32),
    (1, 37, 2, 64, 64),
    (2, 100, 3, 128, 128),
    (1, 333, 2, 64, 32),
    (3, 77, 1, 32, 128),
    (1, 1000, 2, 64, 64),
]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(cuda, "POISON_OUTPUTS", True)


def _reference_and_kernel(inputs, output_final_state=True, **kwargs):
    """(reference results, kernel results): o, final state and the gradients of every input."""
    leaves = {n: x for n, x in inputs.items() if x is not None}
    reference_inputs = {
        n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()
    }
    g = torch.Generator(device="cuda").manual_seed(7)
    results = []
    for fn, ins in ((chunk_decay_fast_weights, reference_inputs), (decay_fast_weights, inputs)):
        extra = kwargs if fn is decay_fast_weights else {}
        o, final = fn(**ins, output_final_state=output_final_state, **extra)
        g.manual_seed(7)
        do = torch.randn(o.shape, generator=g, device="cuda", dtype=torch.float64).to(inputs["v"].dtype)
        outputs, grad_outputs = [o], [do.to(o.dtype)]
        if output_final_state:
            outputs.append(final)
            grad_outputs.append(
                torch.randn(final.shape, generator=g, device="cuda", dtype=torch.float64).to(final.dtype)
            )
        wrt = [ins[n] for n in leaves]
        grads = torch.autograd.grad(outputs, wrt, grad_outputs)
        results.append(
            {"o": o, "final_state": final, **{f"d{n}": dx for n, dx in zip(leaves, grads, strict=True)}}
        )
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
def test_matches_float64_reference(shape, gates, dtype):
    inputs = random_inputs(*shape, gates=gates, dtype=dtype, device="cuda", seed=sum(shape))
    expected, actual = _reference_and_kernel(inputs, kernel="cuda")
    for name in expected:
        error = relative_rms_error(actual[name], expected[name])
        assert error < TOL[dtype], f"{name}: relative RMS error {error:.2e} (tolerance {TOL[dtype]:.0e})"


@pytest.mark.parametrize("variant", ["no_initial_state", "no_final_state", "key_gate_only", "value_gate_only",
                                     "scalar_gates", "odd_sizes", "non_contiguous"])  # fmt: skip
def test_variants(variant):
    dtype = torch.float32
    shape = (2, 45, 3, 64, 64) if variant != "odd_sizes" else (2, 45, 3, 40, 65)
    inputs = random_inputs(*shape, dtype=dtype, device="cuda", initial_state=variant != "no_initial_state")
    if variant == "key_gate_only":
        inputs["log_value_gate"] = None
    if variant == "value_gate_only":
        inputs["log_key_gate"] = None
    if variant == "scalar_gates":
        for name in ("log_key_gate", "log_value_gate"):
            inputs[name] = inputs[name][..., :1].detach().requires_grad_()
    if (
        variant == "non_contiguous"
    ):  # q, k, v as views into one fused projection, as attention layers make them
        fused = torch.cat([inputs[n].detach() for n in ("q", "k", "v")], dim=-1).requires_grad_()
        q, k, v = fused.split(64, dim=-1)
        expected, actual = _reference_and_kernel({**inputs, "q": q, "k": k, "v": v}, kernel="cuda")
        expected, actual = ({n: r[n] for n in ("o", "final_state")} for r in (expected, actual))
    else:
        expected, actual = _reference_and_kernel(
            inputs, output_final_state=variant != "no_final_state", kernel="cuda"
        )
    for name in expected:
        if expected[name] is None:
            assert actual[name] is None, name
            continue
        error = relative_rms_error(actual[name], expected[name])
        assert error < TOL[dtype], f"{name}: relative RMS error {error:.2e}"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scan_matches_its_specification(reverse, dtype):
    """The primitive itself, every output at once: out, out_pre, both final states, the epilogue."""
    B, T, H, K, V = 2, 53, 3, 64, 32
    x = {n: t.detach() for n, t in random_inputs(B, T, H, K, V, dtype=dtype, device="cuda").items()}
    gen = torch.Generator(device="cuda").manual_seed(3)
    x1 = torch.randn(B, T, H, V, generator=gen, device="cuda")
    x2 = torch.randn(B, T, H, V, generator=gen, device="cuda").to(dtype)
    start = torch.randn(B, H, V, generator=gen, device="cuda")
    s0 = torch.randn(B, H, V, K, generator=gen, device="cuda").transpose(-1, -2)  # strided [B, H, K, V]
    kwargs = dict(reverse=reverse, output_pre=True, output_final_state=True, output_final_pre_state=True,
                  gate_grad_inputs=(x1, x2, start))  # fmt: skip
    actual = cuda.cuda_scan(
        x["q"], x["k"], x["v"], x["log_key_gate"], x["log_value_gate"], s0, out_dtype=dtype, **kwargs
    )
    as64 = lambda t: t.double()
    expected = scan_reference(
        as64(x["q"]), as64(x["k"]), as64(x["v"]), as64(x["log_key_gate"]), as64(x["log_value_gate"]), as64(s0),
        out_dtype=torch.float64, **{**kwargs, "gate_grad_inputs": (as64(x1), as64(x2), as64(start))},
    )  # fmt: skip
    for name in expected._fields:
        error = relative_rms_error(getattr(actual, name), getattr(expected, name))
        assert error < TOL[dtype], f"{name}: relative RMS error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_step_updates_the_state_in_place(dtype):
    B, T, H, K, V = 4, 9, 3, 64, 64
    x = {n: t.detach() for n, t in random_inputs(B, T, H, K, V, dtype=dtype, device="cuda").items()}
    state = x["initial_state"].clone()
    state_ptr = state.data_ptr()
    expected, final = chunk_decay_fast_weights(
        *(x[n].double() for n in ("q", "k", "v", "log_key_gate", "log_value_gate", "initial_state")),
        output_final_state=True,
    )
    outputs = []
    for t in range(T):
        token = [x[n][:, t] for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]  # [B, H, D]
        outputs.append(decay_fast_weights_step(*token, state, kernel="cuda"))
    assert state.data_ptr() == state_ptr
    assert relative_rms_error(torch.stack(outputs, dim=1), expected) < TOL[dtype]
    assert relative_rms_error(state, final) < 1e-5


def test_no_per_step_state_in_memory():
    """fwd + bwd at T = 8192: the per-step states would be 512 MiB; the kernel stays far below."""
    B, T, H, D = 1, 8192, 4, 64
    inputs = random_inputs(B, T, H, D, D, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, final = decay_fast_weights(**inputs, output_final_state=True, kernel="cuda")
    (o.float().square().sum() + final.square().sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    per_step_states = B * T * H * D * D * 4
    assert peak < per_step_states / 4, f"peak {peak / 2**20:.1f} MiB"
