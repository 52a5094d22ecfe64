"""Decaying fast weights: the chunked (training) and recurrent (generation) forms against a naive
float64 loop written from the paper's formula, on outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch

from dfw.attention import FastWeightAttention

B, T, H, D, M, C = 2, 37, 2, 8, 12, 32  # T is not a multiple of the chunk size C (two sub-chunks of 16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def paper_loop(core: FastWeightAttention, q, k, v, x, S0):
    """S_t = (z_t f_t^T) ⊙ S_{t-1} + v_t phi(k_t)^T, y_t = S_t phi(q_t): the paper's d x m state."""
    W = core.feature_map.weight  # (H, m, d)
    S = S0.transpose(-1, -2)  # (B, H, d, m)
    outputs = []
    for t in range(q.shape[1]):
        f = torch.sigmoid(core.key_gate(x[:, t])).view(B, H, M)  # (B, H, m)
        z = torch.sigmoid(core.value_gate(x[:, t])).view(B, H, D)  # (B, H, d)
        phi_q = torch.einsum("bhd,hmd->bhm", q[:, t], W) * D**-0.5
        phi_k = torch.einsum("bhd,hmd->bhm", k[:, t], W)
        S = (z.unsqueeze(-1) * f.unsqueeze(-2)) * S + v[:, t].unsqueeze(-1) * phi_k.unsqueeze(-2)
        outputs.append(torch.einsum("bhdm,bhm->bhd", S, phi_q))
    return torch.stack(outputs, dim=1), S.transpose(-1, -2)


@pytest.mark.parametrize("gate_bias", [None, -7.0, 7.0], ids=["uniform-init", "gates-near-0", "gates-near-1"])
def test_chunked_and_recurrent_forms_match_the_paper_loop(gate_bias):
    torch.manual_seed(0)
    core = FastWeightAttention(16, H, D, state_size=M, chunk_size=C).double()
    with torch.no_grad():
        for gate in (core.key_gate, core.value_gate):
            gate.weight.normal_(0, 0.3)  # data-dependent gates
            if gate_bias is not None:
                gate.bias.fill_(gate_bias)  # sigmoid(-7) ~ 9e-4 per step, sigmoid(7) ~ 1 - 9e-4
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(B, H, M, D, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v, x, S0, *core.parameters()]

    results = {
        "chunked": core(q, k, v, x, state=S0, output_state=True),
        "recurrent": core.recurrent(q, k, v, x, state=S0),
        "paper": paper_loop(core, q, k, v, x, S0),
    }
    grad_o, grad_S = torch.randn_like(results["paper"][0]), torch.randn_like(results["paper"][1])
    grads = {}
    for name, (o, S) in results.items():
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        grads[name] = torch.autograd.grad((o * grad_o).sum() + (S * grad_S).sum(), inputs)
    o_ref, S_ref = results["paper"]
    for name in ("chunked", "recurrent"):
        o, S = results[name]
        assert rel(o, o_ref) < 1e-6, name
        assert rel(S, S_ref) < 1e-6, name
        for g, g_ref in zip(grads[name], grads["paper"], strict=True):
            assert rel(g, g_ref) < 1e-6, name


def test_chunked_form_is_finite_in_float32_with_tiny_gates():
    """Gates of 1e-3 per step over 200 tokens: a naive cumulative-product form would overflow."""
    torch.manual_seed(0)
    core = FastWeightAttention(16, H, D, state_size=M, chunk_size=64)
    with torch.no_grad():
        core.key_gate.bias.fill_(-6.9)
        core.value_gate.bias.fill_(-6.9)
    q, k, v = (torch.randn(1, 203, H, D) for _ in range(3))
    x = torch.randn(1, 203, 16)
    o, S = core(q, k, v, x, output_state=True)
    o64, S64 = core.double()(q.double(), k.double(), v.double(), x.double(), output_state=True)
    assert torch.isfinite(o).all()
    assert rel(o.double(), o64) < 1e-5 and rel(S.double(), S64) < 1e-5


def test_block_by_block_equals_whole_sequence():
    """The recurrent form consumes a block at a time, carrying the state, as generation does."""
    torch.manual_seed(0)
    core = FastWeightAttention(16, H, D, state_size=M, chunk_size=C).double()
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(B, T, 16, dtype=torch.float64)
    whole, _ = core(q, k, v, x)
    first, state = core(q[:, :20], k[:, :20], v[:, :20], x[:, :20], output_state=True)
    rest = []
    for t in range(20, T):
        o, state = core.recurrent(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], x[:, t : t + 1], state)
        rest.append(o)
    assert rel(torch.cat([first, *rest], dim=1), whole) < 1e-10
    assert state.shape == (B, H, M, D)


def test_gate_options_and_output_norm():
    core = FastWeightAttention(16, H, D, state_size=M, gates="key", output_norm=True)
    assert core.gate_names == ("key_gate",) and core.output_norm is not None
    o, S = core(*(torch.randn(1, 5, H, D) for _ in range(3)), torch.randn(1, 5, 16), output_state=True)
    assert o.shape == (1, 5, H, D) and S.shape == (1, H, M, D)
