"""The fast PyTorch path (chunked.py) against the loop over time, which the tests trust.

`chunked_decay_fast_weights` runs `ScanDecayFastWeights` with `chunk_scan`: outputs, final state and
every gradient (initial state included, with a final-state gradient) in float64, for T not a multiple
of the chunk, gates near 0, near 1 and mixed, scalar and absent gates; `chunk_scan` against the scan's
specification; float32 and bfloat16 against float64; a log-gate of -inf; what autograd keeps.
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels import chunk_decay_fast_weights, decay_fast_weights, recurrent_decay_fast_weights
from dfw_kernels.chunked import chunk_scan, chunk_size_for, chunked_decay_fast_weights
from dfw_kernels.closed_form import scan_reference
from dfw_kernels.testing import random_inputs, relative_rms_error

TOL = 1e-10  # float64


def _outputs_and_grads(fn, inputs, output_final_state=True, **kwargs):
    """Outputs and the gradients of a random linear functional of o (and of the final state)."""
    o, final = fn(**inputs, output_final_state=output_final_state, **kwargs)
    g = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * torch.randn(final.shape, generator=g, dtype=torch.float64)).sum()
    leaves = {name: x for name, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    result = {"o": o, **{f"d{name}": dx for name, dx in zip(leaves, grads, strict=True)}}
    if final is not None:
        result["final_state"] = final
    return result


def _assert_close(actual, expected, tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.isfinite(actual[name]).all(), name
        assert relative_rms_error(actual[name], expected[name]) < tol, name


@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_matches_loop(gates, T, chunk_size):
    inputs = random_inputs(2, T, 2, 8, 6, gates=gates)
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs)
    actual = _outputs_and_grads(chunked_decay_fast_weights, inputs, chunk_size=chunk_size)
    _assert_close(actual, expected, TOL)


@pytest.mark.parametrize("side", ["key", "value", "none", "scalar", "scalar_key"])
@pytest.mark.parametrize("initial_state", [True, False])
@pytest.mark.parametrize("output_final_state", [True, False])
def test_gate_variants(side, initial_state, output_final_state):
    inputs = random_inputs(1, 11, 2, 4, 5, initial_state=initial_state)
    if side in ("key", "none"):
        inputs["log_value_gate"] = None
    if side in ("value", "none"):
        inputs["log_key_gate"] = None
    if side.startswith("scalar"):  # one gate per head, [B, T, H, 1]
        inputs["log_key_gate"] = inputs["log_key_gate"][..., :1].detach().requires_grad_()
    if side == "scalar":
        inputs["log_value_gate"] = inputs["log_value_gate"][..., :1].detach().requires_grad_()
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs, output_final_state)
    actual = _outputs_and_grads(chunked_decay_fast_weights, inputs, output_final_state, chunk_size=4)
    _assert_close(actual, expected, TOL)


def test_only_final_state_used():
    inputs = random_inputs(1, 9, 1, 3, 4)
    leaves = [x for name, x in inputs.items() if name != "q"]  # q does not reach S_T
    _, final_ref = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    _, final = chunked_decay_fast_weights(**inputs, output_final_state=True, chunk_size=4)
    expected = torch.autograd.grad(final_ref.square().sum(), leaves)
    actual = torch.autograd.grad(final.square().sum(), leaves)
    for a, e in zip(actual, expected, strict=True):
        assert relative_rms_error(a, e) < TOL


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_chunk_scan_is_the_scan(reverse, chunk_size):
    """Every output of the Scan protocol, forward and reverse, as scan_reference specifies it."""
    inputs = {n: x.detach() for n, x in random_inputs(2, 13, 2, 5, 4).items()}
    g = torch.Generator().manual_seed(2)
    x1, x2 = (torch.randn(2, 13, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    r0 = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    kwargs = dict(
        reverse=reverse,
        out_dtype=torch.float64,
        output_pre=True,
        output_final_state=True,
        output_final_pre_state=True,
        gate_grad_inputs=(x1, x2, r0),
    )
    expected = scan_reference(*inputs.values(), **kwargs)
    actual = chunk_scan(*inputs.values(), **kwargs, chunk_size=chunk_size)
    for name in expected._fields:
        assert relative_rms_error(getattr(actual, name), getattr(expected, name)) < TOL, name


@pytest.mark.parametrize("gates", ["near_zero", "mixed"])
def test_float32_matches_float64_with_small_gates(gates):
    """Small gates are where chunked forms lose float32 precision. Measured: outputs, final state and the
    q, k, v, initial-state gradients ~1.2e-7; the gate gradients 2.2e-5 at gates ~1e-3 (1.6e-2 through
    autograd of reference.chunk_decay_fast_weights; 1.6e-6 for the loop's scan): rounding of the chunk's
    accumulated log-decays, ~ulp(chunk decay), enters every factor."""
    inputs64 = random_inputs(2, 200, 2, 32, 32, gates=gates)
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs64)
    inputs32 = {n: x.detach().float().requires_grad_() for n, x in inputs64.items()}
    actual = _outputs_and_grads(chunked_decay_fast_weights, inputs32, chunk_size=64)
    for name in expected:
        tol = 5e-5 if name.startswith("dlog") else 1e-6
        assert relative_rms_error(actual[name], expected[name]) < tol, name


def test_bfloat16_inputs():
    """bf16 q, k, v: states and gates in float32, the output in bf16, gradients in the inputs' dtypes."""
    inputs64 = random_inputs(1, 70, 2, 16, 16)
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs64)
    inputs = {
        n: x.detach().to(torch.bfloat16 if n in ("q", "k", "v") else torch.float32).requires_grad_()
        for n, x in inputs64.items()
    }
    actual = _outputs_and_grads(chunked_decay_fast_weights, inputs)
    assert actual["o"].dtype == torch.bfloat16 and actual["final_state"].dtype == torch.float32
    assert actual["dq"].dtype == torch.bfloat16 and actual["dlog_key_gate"].dtype == torch.float32
    _assert_close(actual, expected, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [chunked_decay_fast_weights, chunk_decay_fast_weights])
def test_minus_infinity_log_gate(fn, dtype):
    """A gate of exactly 0 (log-gate -inf, or below -1e37) resets the state: the chunked forms clamp
    log-gates to a finite floor and give the loop's outputs and gradients, not NaN."""
    inputs64 = random_inputs(1, 40, 2, 8, 8)
    with torch.no_grad():
        inputs64["log_key_gate"][0, 5, 0, :3] = float("-inf")
        inputs64["log_value_gate"][0, 17, 1] = -1e38
        inputs64["log_key_gate"][0, 30, 1, 2] = float("-inf")
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs64)
    for name, value in expected.items():
        assert torch.isfinite(value).all(), f"the loop's {name} is finite"
    inputs = {n: x.detach().to(dtype).requires_grad_() for n, x in inputs64.items()}
    actual = _outputs_and_grads(fn, inputs, chunk_size=16)
    _assert_close(actual, expected, 1e-10 if dtype == torch.float64 else 1e-5)


def test_chunk_size_follows_the_gates():
    """The largest power of two whose chunks stay within max_chunk_decay; 1 where a gate is ~0."""
    B, T, H, D = 1, 64, 1, 4
    gate = lambda nats: torch.full((B, T, H, D), -nats)  # noqa: E731
    assert chunk_size_for(None, None, 64, torch.float32) == 64
    assert chunk_size_for(gate(0.01), gate(0.01), 48, torch.float32) == 32  # a power of two <= 48
    assert chunk_size_for(gate(3.5), gate(3.5), 64, torch.float32) == 16  # the demo's smallest gates, 1/32
    assert chunk_size_for(gate(3.5), None, 64, torch.float32) == 32
    assert chunk_size_for(gate(3.5), gate(3.5), 64, torch.float64) == 64
    reset = gate(0.01)
    reset[0, 40, 0, 1] = float("-inf")
    assert chunk_size_for(reset, None, 64, torch.float32) == 1


def test_backward_keeps_no_chunk_tensors():
    """Autograd keeps q, k, v, the two log-gates and one [B, T, H, V] read: nothing per chunk pair."""
    inputs = random_inputs(1, 256, 2, 16, 16, dtype=torch.float32, initial_state=False)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = chunked_decay_fast_weights(**inputs, chunk_size=16)
    assert sum(storages.values()) <= 6 * inputs["v"].numel() * 4
    o.sum().backward()  # and the backward runs from what was kept
    assert all(torch.isfinite(x.grad).all() for x in inputs.values() if x is not None)


def test_decay_fast_weights_takes_the_chunked_path_on_cpu():
    inputs = random_inputs(1, 20, 1, 4, 4)
    o, _ = decay_fast_weights(**inputs, kernel="torch")
    expected, _ = chunked_decay_fast_weights(**inputs, chunk_size=64)
    assert torch.equal(o, expected)


def test_final_state_can_be_written_in_place():
    """The generation cache copies each new state into the old one's storage (fixed addresses)."""
    inputs = random_inputs(1, 5, 1, 4, 4)
    _, state = chunked_decay_fast_weights(**inputs, output_final_state=True)
    _, new_state = chunked_decay_fast_weights(**inputs, output_final_state=True)
    state.copy_(new_state)  # raised for a final state that was a view of the scan's buffer
    assert torch.equal(state, new_state)
