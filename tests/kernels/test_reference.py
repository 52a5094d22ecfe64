"""The two PyTorch references agree: the loop over time and the stable chunkwise form, in float64.

Outputs, final state and every gradient (the initial state's included), for T not a multiple of the
chunk, gates near 0, near 1 and mixed, scalar (per-head) gates and absent gates.
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels import chunk_decay_fast_weights, recurrent_decay_fast_weights
from dfw_kernels.testing import random_inputs, relative_rms_error

TOL = 1e-10  # float64


def _outputs_and_grads(fn, inputs, **kwargs):
    o, final = fn(**inputs, output_final_state=True, **kwargs)
    # A random linear functional of both outputs, so that every gradient path is exercised.
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (
        final * torch.randn(final.shape, generator=g, dtype=final.dtype)
    ).sum()
    leaves = {name: x for name, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final_state": final, **{f"d{name}": dx for name, dx in zip(leaves, grads, strict=True)}}


@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("T", [1, 13, 37])
def test_chunked_matches_loop(gates, T):
    inputs = random_inputs(2, T, 2, 8, 6, gates=gates)
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs)
    actual = _outputs_and_grads(chunk_decay_fast_weights, inputs, chunk_size=8, subchunk_size=4)
    for name in expected:
        assert relative_rms_error(actual[name], expected[name]) < TOL, name


@pytest.mark.parametrize("side", ["key", "value", "none", "scalar"])
def test_gate_variants(side):
    inputs = random_inputs(1, 11, 2, 4, 5)
    if side in ("key", "none"):
        inputs["log_value_gate"] = None
    if side in ("value", "none"):
        inputs["log_key_gate"] = None
    if side == "scalar":  # one gate per head, [B, T, H, 1]
        inputs["log_key_gate"] = inputs["log_key_gate"][..., :1].detach().requires_grad_()
        inputs["log_value_gate"] = inputs["log_value_gate"][..., :1].detach().requires_grad_()
    expected = _outputs_and_grads(recurrent_decay_fast_weights, inputs)
    actual = _outputs_and_grads(chunk_decay_fast_weights, inputs, chunk_size=4, subchunk_size=2)
    for name in expected:
        assert relative_rms_error(actual[name], expected[name]) < TOL, name


def test_loop_is_the_recurrence():
    """One step by hand: S_1 = diag(a) S_0 diag(b) + k^T v, o = q S_1."""
    inputs = {n: x.detach() for n, x in random_inputs(1, 1, 1, 3, 2).items()}
    a, b = inputs["log_key_gate"][0, 0, 0].exp(), inputs["log_value_gate"][0, 0, 0].exp()
    k, v, q = inputs["k"][0, 0, 0], inputs["v"][0, 0, 0], inputs["q"][0, 0, 0]
    S1 = a[:, None] * inputs["initial_state"][0, 0] * b[None, :] + torch.outer(k, v)
    o, final = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    torch.testing.assert_close(final[0, 0], S1)
    torch.testing.assert_close(o[0, 0, 0], q @ S1)


def test_chunked_stays_finite_in_float32_with_small_gates():
    """Gates of ~1e-3 for 200 steps: ~1400 nats of decay, which a split exponent would overflow."""
    inputs = {n: x.detach() for n, x in random_inputs(1, 200, 1, 16, 16, gates="near_zero").items()}
    expected, expected_final = recurrent_decay_fast_weights(**inputs, output_final_state=True)
    inputs32 = {n: x.float() for n, x in inputs.items()}
    o, final = chunk_decay_fast_weights(**inputs32, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert relative_rms_error(o, expected) < 1e-5
    assert relative_rms_error(final, expected_final) < 1e-5
