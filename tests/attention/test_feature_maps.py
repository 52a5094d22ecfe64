"""Each feature map is the one its paper describes, initialised as docs/attention.md says."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dfw_kernels.testing import relative_rms_error

from dfw.attention import FEATURE_MAPS, head_gate_bias
from tests.attention.helpers import D, H, build, preset


def _map(name: str, state_size=None, **options):
    return FEATURE_MAPS[name](H, D, state_size, options)


def test_favor_estimates_the_softmax_kernel():
    """E[phi(q) . phi(k)] = exp(q . k / sqrt(D)) (keys unstabilised; no query stabiliser here)."""
    torch.manual_seed(0)
    favor = _map("favor", state_size=8192)
    q, k = 0.5 * torch.randn(1, 1, H, D), 0.5 * torch.randn(1, 6, H, D)
    estimate = torch.einsum("bthm,bshm->bhts", favor(q), favor(k))  # (1, H, 1, 6)
    exact = torch.einsum("bthd,bshd->bhts", q, k).mul(D**-0.5).exp()
    assert ((estimate - exact).abs() / exact).max() < 0.1
    # Orthogonal: within a block of D rows, the directions are orthogonal.
    rows = F.normalize(favor.projection[0, :D], dim=-1)
    torch.testing.assert_close(rows @ rows.T, torch.eye(D), atol=1e-5, rtol=0)


def test_performer_attention_approximates_softmax_attention():
    """With many features, the performer preset's normalised read is close to softmax attention."""
    torch.manual_seed(0)
    core = build(preset("performer", state_size=4096)).double().eval()
    q, k, v = (0.5 * torch.randn(1, 20, H, D, dtype=torch.float64) for _ in range(3))
    o, _ = core(q, k, v, torch.zeros(1, 20, 16, dtype=torch.float64))
    expected = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True
    ).transpose(1, 2)
    assert relative_rms_error(o, expected) < 0.05


def test_rff_estimates_a_gaussian_kernel_of_normalised_inputs():
    """E[phi(x) . phi(y)] = exp(-|s*(x^ - y^)|^2 / 2), proportional to exp(x^ . y^) at s = 1."""
    torch.manual_seed(0)
    rff = _map("rff", state_size=16384)
    x, y = torch.randn(1, 1, H, D), torch.randn(1, 5, H, D)
    estimate = torch.einsum("bthm,bshm->bhts", rff(x), rff(y))
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    exact = torch.einsum("bthd,bshd->bhts", xn, yn).sub(1).exp()
    assert (estimate - exact).abs().max() < 0.03
    assert isinstance(rff.scale, torch.nn.Parameter)
    assert not isinstance(_map("rff", state_size=8, learned_scale=False).scale, torch.nn.Parameter)


def test_dpfp_is_schlag_et_al_formula():
    x = torch.randn(2, 3, H, D)
    phi = _map("dpfp", dpfp_order=2)(x)
    r = torch.cat([x.relu(), (-x).relu()], dim=-1)  # (.., 2D)
    n = 2 * D
    for j in (1, 2):
        for i in range(n):
            torch.testing.assert_close(phi[..., (j - 1) * n + i], r[..., i] * r[..., (i - j) % n])
    assert phi.shape[-1] == 4 * D and (phi >= 0).all()


def test_elu_and_relu_mlp():
    x = torch.randn(2, 3, H, D)
    torch.testing.assert_close(_map("elu")(x), F.elu(x) + 1)
    mlp = _map("relu_mlp", state_size=5)
    expected = torch.relu(torch.einsum("bthd,hmd->bthm", x, mlp.weight) + mlp.bias)
    torch.testing.assert_close(mlp(x), expected)
    assert mlp.weight.shape == (H, 5, D)  # one MLP per head, applied to both q and k


def test_favor_redraws_every_n_training_calls_and_never_in_eval():
    core = build(preset("performer", redraw_interval=2))
    first = core.feature_map.projection.clone()
    same_seed = build(preset("performer", redraw_interval=2))
    other_layer = build(preset("performer", redraw_interval=2), layer_idx=1)
    torch.testing.assert_close(same_seed.feature_map.projection, first, rtol=0, atol=0)
    assert not torch.equal(other_layer.feature_map.projection, first)

    inputs = (*(torch.randn(1, 4, H, D) for _ in range(3)), torch.randn(1, 4, 16))
    core.eval()
    for _ in range(5):
        core(*inputs)
    assert torch.equal(core.feature_map.projection, first)  # fixed at evaluation
    core.train()
    core(*inputs), core(*inputs)
    assert torch.equal(core.feature_map.projection, first)  # calls 0 and 1 use draw 0
    core(*inputs)
    second = core.feature_map.projection.clone()
    assert not torch.equal(second, first)  # call 2 redraws
    # Saved with the model: a reloaded core continues the schedule with the same features.
    reloaded = build(preset("performer", redraw_interval=2))
    reloaded.load_state_dict(core.state_dict())
    assert torch.equal(reloaded.feature_map.projection, second) and reloaded.feature_map.calls == 3


def test_conversion_initialisation():
    # linear (DFW): the identity when m == D.
    decay = build(preset("decay"))
    torch.testing.assert_close(decay.feature_map.weight, torch.eye(D).expand(H, D, D))
    # decay gates (DFW): zero weights; biases logit(u), u evenly over (1/n, 1 - 1/n) within each head.
    for gate in (decay.key_gate, decay.value_gate):
        assert torch.count_nonzero(gate.weight) == 0
        u = torch.sigmoid(gate.bias.view(H, D))
        torch.testing.assert_close(u[0], torch.linspace(1 / D, 1 - 1 / D, D))
        torch.testing.assert_close(u[0], u[1])
    # gated (RFA): zero weights; heads remember over 32 .. 1024 tokens.
    rfa = build(preset("rfa"))
    assert torch.count_nonzero(rfa.head_gate.weight) == 0
    g = torch.sigmoid(rfa.head_gate.bias)
    torch.testing.assert_close(1 / (1 - g), torch.tensor([32.0, 1024.0]), rtol=1e-4, atol=0)
    timescales = 1 / (1 - torch.sigmoid(head_gate_bias(4)))
    torch.testing.assert_close(
        timescales, torch.logspace(math.log10(32), math.log10(1024), 4), rtol=1e-4, atol=0
    )
    # delta: beta = 1/2 everywhere at conversion.
    delta = build(preset("delta"))
    assert torch.count_nonzero(delta.write_strength.weight) == 0
    assert torch.all(torch.sigmoid(delta.write_strength.bias) == 0.5)


@pytest.mark.parametrize("name", ["linear", "t2r", "performer", "rfa", "delta"])
def test_no_gates_where_the_method_has_none(name):
    core = build(preset(name))
    expected = {"rfa": ("head_gate",), "delta": ("write_strength",)}.get(name, ())
    assert core.gate_names == expected
    assert {child for child, _ in core.named_children()} == {"feature_map", *expected}
