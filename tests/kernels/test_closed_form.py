"""The backward the CUDA kernel runs (three scans, closed-form gate gradients), checked on CPU.

`ScanDecayFastWeights` is the autograd.Function the CUDA path uses; here it runs with the kernel's
specification `scan_reference` in float64 and must match autograd through the plain loop: outputs,
final state and every gradient, the initial state's included.
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels import recurrent_decay_fast_weights
from dfw_kernels.closed_form import ScanDecayFastWeights, scan_reference
from dfw_kernels.testing import random_inputs, relative_rms_error

TOL = 1e-11  # float64; the gate formulas of docs/math.md come within ~1e-15 of autograd (T = 17 below)


def _loss_and_grads(o, final, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
    if final is not None:
        loss = (
            loss + (final * torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)).sum()
        )
    return torch.autograd.grad(loss, leaves)


def _run_scan_function(inputs, output_final_state):
    return ScanDecayFastWeights.apply(
        scan_reference,
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["log_key_gate"],
        inputs["log_value_gate"],
        inputs["initial_state"],
        output_final_state,
    )


@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("output_final_state", [True, False])
@pytest.mark.parametrize("initial_state", [True, False])
def test_scan_backward_matches_autograd(gates, output_final_state, initial_state):
    inputs = random_inputs(2, 23, 2, 5, 4, gates=gates, initial_state=initial_state)
    leaves = [x for x in inputs.values() if x is not None]
    o_ref, final_ref = recurrent_decay_fast_weights(**inputs, output_final_state=output_final_state)
    expected = _loss_and_grads(o_ref, final_ref, leaves)
    o, final = _run_scan_function(inputs, output_final_state)
    actual = _loss_and_grads(o, final, leaves)
    assert relative_rms_error(o, o_ref) < TOL
    if output_final_state:
        assert relative_rms_error(final, final_ref) < TOL
    else:
        assert final is None
    names = [n for n, x in inputs.items() if x is not None]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert relative_rms_error(a, e) < TOL, f"d{name}"


def test_only_final_state_used():
    """The loss depends on S_T alone: do is None in the backward, and the gradients still match."""
    inputs = random_inputs(1, 9, 1, 3, 4)
    leaves = [x for name, x in inputs.items() if name != "q"]  # q does not reach S_T
    _, final_ref = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    _, final = _run_scan_function(inputs, True)
    expected = torch.autograd.grad(final_ref.square().sum(), leaves)
    actual = torch.autograd.grad(final.square().sum(), leaves)
    for a, e in zip(actual, expected, strict=True):
        assert relative_rms_error(a, e) < TOL


@pytest.mark.parametrize("absent", ["log_key_gate", "log_value_gate"])
def test_one_sided_gates(absent):
    inputs = random_inputs(1, 10, 2, 4, 3)
    inputs[absent] = None
    leaves = [x for x in inputs.values() if x is not None]
    expected = _loss_and_grads(*recurrent_decay_fast_weights(**inputs, output_final_state=True), leaves)
    actual = _loss_and_grads(*_run_scan_function(inputs, True), leaves)
    for a, e in zip(actual, expected, strict=True):
        assert relative_rms_error(a, e) < TOL


def test_gate_gradients_are_reverse_cumulative_sums():
    """The closed form by hand, without scans, in both forms of closed_form.py's docstring."""
    inputs = random_inputs(1, 17, 1, 4, 3)
    q, k, v, lk, lv, s0 = inputs.values()
    o, final = recurrent_decay_fast_weights(q, k, v, lk, lv, s0, output_final_state=True)
    do, dfinal = torch.randn_like(o), torch.randn_like(final)
    dq, dk, dv, dlk, dlv = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), [q, k, v, lk, lv])
    revcumsum = lambda x: x.flip(1).cumsum(1).flip(1)  # over T of [B, T, H, D]
    # As in docs/math.md, "Gate gradients".
    key_side = revcumsum(q * dq - k * dk) + (dfinal * final).sum(-1)[:, None]  # (B, T, H, K)
    value_side = revcumsum(o * do - v * dv) + (dfinal * final).sum(-2)[:, None]  # (B, T, H, V)
    assert relative_rms_error(key_side, dlk) < TOL
    assert relative_rms_error(value_side, dlv) < TOL
    # Without each token's own term, P_T = S_T - k_T^T v_T and dS_T counted as written at T.
    qk, v_do = (q * k).sum(-1, keepdim=True), (v * do).sum(-1, keepdim=True)  # (B, T, H, 1)
    dq_pre, o_pre = dq - v_do * k, o - qk * v
    dk_pre, dv_pre = dk - v_do * q, dv - qk * do
    dk_pre[:, -1] -= torch.einsum("bhkv,bhv->bhk", dfinal, v[:, -1])
    dv_pre[:, -1] -= torch.einsum("bhkv,bhk->bhv", dfinal, k[:, -1])
    P_T = final - k[:, -1].unsqueeze(-1) * v[:, -1].unsqueeze(-2)  # (B, H, K, V)
    key_side = revcumsum(q * dq_pre - k * dk_pre) + (dfinal * P_T).sum(-1)[:, None]
    value_side = revcumsum(o_pre * do - v * dv_pre) + (dfinal * P_T).sum(-2)[:, None]
    assert relative_rms_error(key_side, dlk) < TOL
    assert relative_rms_error(value_side, dlv) < TOL


@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
def test_float32_accuracy(gates):
    """The kernel's arithmetic (float32 states, closed-form gate gradients) within the GPU tests' 1e-5."""
    inputs = random_inputs(1, 64, 2, 16, 16, gates=gates)
    leaves = list(inputs.values())
    expected = _loss_and_grads(*recurrent_decay_fast_weights(**inputs, output_final_state=True), leaves)
    inputs32 = {n: x.detach().float().requires_grad_() for n, x in inputs.items()}
    actual = _loss_and_grads(*_run_scan_function(inputs32, True), list(inputs32.values()))
    for name, a, e in zip(inputs, actual, expected, strict=True):
        assert relative_rms_error(a, e) < 1e-5, f"d{name}"


def test_reverse_scan_specification():
    """reverse=True is the forward scan on time-flipped inputs with gates shifted by one step."""
    inputs = {n: x.detach() for n, x in random_inputs(2, 7, 1, 3, 4).items()}
    q, k, v, lk, lv, s0 = inputs.values()
    flip = lambda x: x.flip(1)
    shift = lambda g: torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=1)  # gate of t+1, 1 at the end
    rev = scan_reference(q, k, v, lk, lv, s0, reverse=True, out_dtype=q.dtype, output_final_state=True)
    zero = scan_reference(q, k, v, lk, lv, None, reverse=True, out_dtype=q.dtype, output_pre=True)
    with_s0 = scan_reference(q, k, v, lk, lv, s0, reverse=True, out_dtype=q.dtype, output_pre=True)
    assert relative_rms_error(with_s0.out_pre[:, -1], zero.out_pre[:, -1]) < TOL  # s0 is written at T-1
    fwd = scan_reference(
        flip(q),
        flip(k),
        flip(v),
        flip(shift(lk)),
        flip(shift(lv)),
        s0,
        out_dtype=q.dtype,
        output_final_state=True,
    )
    assert relative_rms_error(rev.out, flip(fwd.out)) < TOL
    last_decay = lk[:, 0].exp().unsqueeze(-1) * lv[:, 0].exp().unsqueeze(-2)  # (B, H, K, V)
    assert relative_rms_error(rev.final_state, fwd.final_state * last_decay) < TOL
