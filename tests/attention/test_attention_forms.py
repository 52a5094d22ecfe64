"""Every attention preset, every registered update rule with each normalisation it accepts, and a sample of
off-preset combinations: the parallel (training) form, the recurrent (generation) form and the in-place
decode step agree in float64 on outputs, final state and every gradient; DFW's forms also agree with the
paper's formula, step by step."""

from __future__ import annotations

import pytest
import torch
from dfw_kernels.testing import relative_rms_error as rel
from omegaconf import OmegaConf

from dfw.attention import FastWeightAttention
from tests.attention.helpers import CHUNK, RECURRENT_PRESETS, C, D, H, build, preset, random_state, rule_cases

B, T = 2, 37  # T odd, and not a multiple of CHUNK

# (feature_map, update_rule, normalization, extra options): combinations no preset uses.
OFF_PRESET = [
    ("identity", "add", "none", {}),
    ("linear", "gated", "none", {"state_size": 12}),
    ("elu", "decay", "denominator", {"gates": "key"}),
    ("rff", "decay", "denominator", {"gates": "value", "learned_scale": False}),
    ("favor", "gated", "sum", {}),
    ("relu_mlp", "gated", "none", {}),
    ("relu_mlp", "delta", "sum", {"state_size": 12}),
    ("elu", "delta", "sum", {}),
    ("favor", "delta", "sum", {}),
    ("dpfp", "add", "sum", {"dpfp_order": 2}),
    ("dpfp", "decay", "none", {}),
    ("hedgehog", "decay", "none", {"state_size": 12}),
]


def _cases():
    for name in RECURRENT_PRESETS:
        yield pytest.param(preset(name, chunk_size=CHUNK), id=name)
    for name, node in rule_cases():
        yield pytest.param(OmegaConf.merge(node, {"chunk_size": CHUNK}), id=f"rule-{name}")
    for feature_map, rule, norm, extra in OFF_PRESET:
        options = dict(
            feature_map=feature_map, update_rule=rule, normalization=norm, chunk_size=CHUNK, state_size=None
        )
        yield pytest.param(preset("decay", **{**options, **extra}), id=f"{feature_map}-{rule}-{norm}")


def _perturb_parameters(core) -> None:
    """Move every parameter off its initialisation (zero gate weights would hide gradient errors)."""
    with torch.no_grad():
        for p in core.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("node", _cases())
def test_parallel_and_recurrent_forms_agree(node):
    torch.manual_seed(0)
    core = build(node).double().eval()  # eval: random features fixed (both forms read the same ones)
    _perturb_parameters(core)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    S0 = random_state(core, B).requires_grad_()
    inputs = [q, k, v, x, S0, *core.parameters()]

    results = {
        "parallel": core(q, k, v, x, state=S0, output_state=True),
        "recurrent": core.recurrent(q, k, v, x, S0),
    }
    grad_o = torch.randn_like(results["recurrent"][0])
    grad_S = torch.randn_like(results["recurrent"][1])
    grads = {}
    for name, (o, S) in results.items():
        assert o.shape == (B, T, H, D) and S.shape == S0.shape, name
        assert torch.isfinite(o).all() and torch.isfinite(S).all(), name
        loss = (o * grad_o).sum() + (S * grad_S).sum()
        grads[name] = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    (o_par, S_par), (o_rec, S_rec) = results["parallel"], results["recurrent"]
    assert rel(o_par, o_rec) < 1e-6
    assert rel(S_par, S_rec) < 1e-6
    names = ["q", "k", "v", "x", "initial_state", *(n for n, _ in core.named_parameters())]
    for name, g_par, g_rec in zip(names, grads["parallel"], grads["recurrent"], strict=True):
        if g_rec.abs().max() == 0:  # x without gates: no gradient in either form
            assert g_par.abs().max() == 0, name
            continue
        assert rel(g_par, g_rec) < 1e-6, name
    assert grads["recurrent"][4].abs().max() > 0  # the initial state matters


# Every preset, and every registered rule with each normalisation it accepts: (id, config node).
CORES = [(name, preset(name)) for name in RECURRENT_PRESETS] + [
    (f"rule-{name}", node) for name, node in rule_cases()
]
each_core = pytest.mark.parametrize("node", [pytest.param(node, id=name) for name, node in CORES])


def _with(node, **overrides):
    return OmegaConf.merge(node, overrides)


@each_core
@pytest.mark.parametrize("length", [1, 16])
def test_short_and_chunk_aligned_lengths(node, length):
    torch.manual_seed(1)
    core = build(_with(node, chunk_size=CHUNK)).double().eval()
    q, k, v = (torch.randn(B, length, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(B, length, C, dtype=torch.float64)
    S0 = random_state(core, B)
    o_par, S_par = core(q, k, v, x, S0, output_state=True)
    o_rec, S_rec = core.recurrent(q, k, v, x, S0)
    assert rel(o_par, o_rec) < 1e-6 and rel(S_par, S_rec) < 1e-6


@each_core
def test_prompt_then_token_by_token_equals_whole_sequence(node):
    """Generation: the parallel form on a prompt, then the recurrent form one token at a time."""
    torch.manual_seed(2)
    core = build(_with(node, chunk_size=CHUNK)).double().eval()
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, T, C, dtype=torch.float64)
    whole, _ = core(q, k, v, x)
    prompt, state = core(q[:, :20], k[:, :20], v[:, :20], x[:, :20], output_state=True)
    tokens = []
    for t in range(20, T):
        o, state = core.recurrent(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], x[:, t : t + 1], state)
        tokens.append(o)
    assert rel(torch.cat([prompt, *tokens], dim=1), whole) < 1e-10


@each_core
def test_decode_step_updates_the_state_in_place_as_the_recurrent_form(node):
    """`step` (what RecurrentCache decodes with) = one token of the recurrent form, in the same state
    tensor."""
    torch.manual_seed(4)
    core = build(_with(node, chunk_size=CHUNK)).double().eval()
    _perturb_parameters(core)
    q, k, v = (torch.randn(B, 1, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(B, 1, C, dtype=torch.float64)
    S0 = random_state(core, B)
    o_rec, S_rec = core.recurrent(q, k, v, x, S0)
    state = S0.clone()
    address = state.data_ptr()
    o_step = core.step(q, k, v, x, state)
    assert state.data_ptr() == address
    assert rel(o_step, o_rec) < 1e-12 and rel(state, S_rec) < 1e-12


@each_core
def test_pads_change_nothing_in_any_form(node):
    """token_mask False marks a pad: a token that leaves the state as it was. The parallel, recurrent and step
    forms of a batch with pads (leading, scattered, trailing) give, at its real tokens, the outputs and final
    state of each row without its pads; parallel and recurrent also agree on every gradient."""
    torch.manual_seed(5)
    core = build(_with(node, chunk_size=CHUNK)).double().eval()
    _perturb_parameters(core)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    token_mask = torch.ones(B, T, dtype=torch.bool)
    token_mask[0, :9] = False  # left padding
    token_mask[1, [0, 4, 5, 17, T - 1]] = False  # pads anywhere
    S0 = random_state(core, B)
    o_par, S_par = core(q, k, v, x, S0, output_state=True, token_mask=token_mask)
    o_rec, S_rec = core.recurrent(q, k, v, x, S0, token_mask=token_mask)
    with torch.no_grad():
        state, steps = S0.clone(), []
        for t in range(T):
            one = slice(t, t + 1)
            steps.append(core.step(q[:, one], k[:, one], v[:, one], x[:, one], state, token_mask[:, one]))
        o_step = torch.cat(steps, dim=1)  # (B, T, H, D)
        for row in range(B):
            real = token_mask[row]
            row_inputs = (t[row, real][None] for t in (q, k, v, x))  # the row without its pads
            o_alone, S_alone = core.recurrent(*row_inputs, S0[row : row + 1])
            forms = {"parallel": (o_par, S_par), "recurrent": (o_rec, S_rec), "step": (o_step, state)}
            for name, (o, S) in forms.items():
                assert rel(o[row, real], o_alone[0]) < 1e-6, (name, row)
                assert rel(S[row], S_alone[0]) < 1e-6, (name, row)
    grad_o = torch.randn_like(o_rec) * token_mask[:, :, None, None]  # a loss on the real tokens only
    inputs = [q, k, v, x, *core.parameters()]
    grad = lambda o, S: torch.autograd.grad(
        (o * grad_o).sum() + S.sum(), inputs, allow_unused=True, materialize_grads=True
    )
    g_par, g_rec = grad(o_par, S_par), grad(o_rec, S_rec)
    for g_p, g_r in zip(g_par, g_rec, strict=True):
        assert (g_r.abs().max() == 0 and g_p.abs().max() == 0) or rel(g_p, g_r) < 1e-6


@each_core
def test_the_allocated_state_is_the_state_before_any_token(node):
    """`allocate_state` (what a RecurrentCache holds from a layer's first call): zeros of the state's shape,
    in the state's own dtype (float32 for float32 and bfloat16 activations, float64 for float64), equivalent
    to no state."""
    torch.manual_seed(6)
    core = build(_with(node, chunk_size=CHUNK)).double().eval()
    q, k, v = (torch.randn(B, 20, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(B, 20, C, dtype=torch.float64)
    state = core.allocate_state(B, q.device, torch.float64)
    o_none, S_none = core(q, k, v, x, output_state=True)
    o_alloc, S_alloc = core(q, k, v, x, state, output_state=True)
    assert state.dtype == torch.float64 and state.shape == S_none.shape and not state.any()
    assert rel(o_alloc, o_none) < 1e-12 and rel(S_alloc, S_none) < 1e-12
    for dtype in (torch.float32, torch.bfloat16):
        state32 = core.allocate_state(3, q.device, dtype)
        assert state32.dtype == torch.float32 and core.state_bytes(3, 1) == state32.numel() * 4


@each_core
def test_float32_parallel_form_is_close_to_float64(node):
    torch.manual_seed(3)
    core = build(_with(node, chunk_size=64)).eval()
    q, k, v = (torch.randn(1, 150, H, D) for _ in range(3))
    x = torch.randn(1, 150, C)
    o32, _ = core(q, k, v, x)
    o64, _ = core.double()(q.double(), k.double(), v.double(), x.double())
    assert rel(o32, o64) < 1e-4


@each_core
def test_state_bytes_is_the_size_of_the_state(node):
    core = build(node)
    _, state = core(*(torch.randn(3, 5, H, D) for _ in range(3)), torch.randn(3, 5, C), output_state=True)
    assert core.state_bytes(3, 5) == core.state_bytes(3, 5000) == state.numel() * state.element_size()


def _paper_loop(core, q, k, v, x, S0):
    """S_t = (z_t f_t^T) ⊙ S_{t-1} + v_t phi(k_t)^T, y_t = S_t phi(q_t): the paper's d x m state, step by
    step, written from the formula (Mao, 2022), independently of the chunked and recurrent forms."""
    W = core.feature_map.weight  # (H, m, d)
    m = W.shape[1]
    S = S0.transpose(-1, -2)  # (B, H, d, m)
    outputs = []
    for t in range(q.shape[1]):
        f = torch.sigmoid(core.key_gate(x[:, t])).view(B, H, m)  # (B, H, m)
        z = torch.sigmoid(core.value_gate(x[:, t])).view(B, H, D)  # (B, H, d)
        phi_q = torch.einsum("bhd,hmd->bhm", q[:, t], W) * D**-0.5
        phi_k = torch.einsum("bhd,hmd->bhm", k[:, t], W)
        S = (z.unsqueeze(-1) * f.unsqueeze(-2)) * S + v[:, t].unsqueeze(-1) * phi_k.unsqueeze(-2)
        outputs.append(torch.einsum("bhdm,bhm->bhd", S, phi_q))
    return torch.stack(outputs, dim=1), S.transpose(-1, -2)


@pytest.mark.parametrize("gate_bias", [None, -7.0, 7.0], ids=["uniform-init", "gates-near-0", "gates-near-1"])
def test_decay_forms_match_the_paper_loop(gate_bias):
    """DFW's chunked and recurrent forms against the paper's formula in float64: outputs, final state and
    every gradient, with data-dependent gates, also near 0 and near 1 (sigmoid(-+7) ~ 9e-4 from the bound)."""
    torch.manual_seed(0)
    core = FastWeightAttention(C, H, D, state_size=12, chunk_size=32).double()
    with torch.no_grad():
        for gate in (core.key_gate, core.value_gate):
            gate.weight.normal_(0, 0.3)  # data-dependent gates
            if gate_bias is not None:
                gate.bias.fill_(gate_bias)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    S0 = torch.randn(B, H, 12, D, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v, x, S0, *core.parameters()]

    results = {
        "chunked": core(q, k, v, x, state=S0, output_state=True),
        "recurrent": core.recurrent(q, k, v, x, state=S0),
        "paper": _paper_loop(core, q, k, v, x, S0),
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
