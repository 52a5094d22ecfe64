"""`attention.window=W` (dfw/attention/window.py): the banded softmax against a full masked softmax, the
parallel form, the recurrent form and the in-place decode step against each other in float64 (outputs, final
state, every gradient, the initial state's included) below, at and above W and across chunk boundaries, pads,
and the property that matters most: right after conversion, every position t < W is the pretrained GPT-2
exactly."""

from __future__ import annotations

import pytest
import torch
from dfw_kernels.testing import relative_rms_error as rel
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.attention.state import state_nbytes, state_tensors
from dfw.attention.window import WindowState, sliding_window_attention
from dfw.errors import ConfigError
from dfw.model import core_factory
from dfw.surgery import convert_attention
from tests.attention.helpers import CHUNK, RECURRENT_PRESETS, C, D, H, build, preset, random_state

B = 2
each_preset = pytest.mark.parametrize("name", RECURRENT_PRESETS)


def naive_window(q, k, v, window, scale, valid=None):
    """Softmax over keys i - W + 1 .. i that are valid (a query that is not valid sees itself only): the whole
    T x T score matrix, masked."""
    T = q.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (i - j >= 0) & (i - j < window)  # (T, T)
    keys = torch.ones(q.shape[0], T, dtype=torch.bool) if valid is None else valid
    allowed = band & (keys[:, None, :] | (i == j))  # (B, T, T)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = scores.logsumexp(-1)  # (B, H, T)
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)
    return o, lse.transpose(1, 2)


@pytest.mark.parametrize(("T", "window"), [(1, 1), (7, 1), (10, 16), (16, 16), (40, 16), (45, 5), (130, 70)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_banded_window_attention_equals_a_masked_full_softmax(T, window, with_lse):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.rand(B, T) > 0.3
    for mask in (None, valid):
        o, lse = sliding_window_attention(q, k, v, window, 0.3, mask, with_lse=with_lse)
        o_ref, lse_ref = naive_window(q, k, v, window, 0.3, mask)
        assert rel(o, o_ref) < 1e-12
        if with_lse:
            assert rel(lse, lse_ref) < 1e-12
        grad = torch.randn_like(o)
        g = torch.autograd.grad((o * grad).sum(), (q, k, v))
        g_ref = torch.autograd.grad((o_ref * grad).sum(), (q, k, v))
        for a, b in zip(g, g_ref, strict=True):  # (W = 1: q and k get no gradient, up to rounding)
            assert rel(a, b) < 1e-12 or (b.abs().max() == 0 and a.abs().max() < 1e-12)


def windowed(name: str, window: int, perturb: bool = True):
    torch.manual_seed(0)
    core = build(preset(name, chunk_size=CHUNK, window=window)).double().eval()
    if perturb:  # every parameter off its initialisation (zero gate weights would hide gradient errors)
        with torch.no_grad():
            for p in core.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return core


def random_window_state(core, seen: list[int]) -> WindowState:
    """A state the core could have reached: random memory, random tokens in the slots below `seen`, zeros in
    the others; positive key features (a denominator's z stays positive), a column of ones with a
    denominator."""
    W = core.window
    state = core.allocate_state(len(seen), torch.device("cpu"), torch.float64)
    filled = (torch.arange(W)[None] < torch.tensor(seen)[:, None])[:, :, None, None]  # (B, W, 1, 1)
    keys = torch.randn_like(state.keys)
    values = torch.randn_like(state.values)
    if core.normalization == "denominator":
        values[..., -1] = 1.0
    write_keys = torch.rand_like(state.write_keys)
    if core.normalization == "sum":
        write_keys = write_keys / write_keys.sum(-1, keepdim=True)
    strength = torch.rand_like(state.write_strength)
    fill = lambda t: torch.where(filled, t, 0.0)
    return WindowState(
        random_state(core, len(seen)),
        fill(keys),
        fill(values),
        fill(write_keys),
        fill(strength),
        torch.tensor(seen),
    )


def differentiable(state: WindowState) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in state_tensors(state) if t.is_floating_point() and t.numel()]


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-6) -> bool:
    """Equal counters, equal empty tensors, floats within `tolerance` (relative RMS) or both zero."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point() or a.numel() == 0:
        return torch.equal(a, b)
    return bool(a.abs().max() == 0 and b.abs().max() == 0) or rel(a, b) < tolerance


@each_preset
@pytest.mark.parametrize(("T", "window"), [(10, 16), (16, 16), (40, 16), (37, 5)])
def test_parallel_recurrent_and_decode_step_agree(name, T, window):
    """From a state with a partly filled buffer (row 0) and a full one (row 1): outputs, final state and every
    gradient of the parallel and recurrent forms; the decode step, token by token, gives the same outputs and
    state in the same tensors."""
    core = windowed(name, window)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    state = random_window_state(core, [3, window + 4])
    inputs = [q, k, v, x, *differentiable(state), *core.parameters()]
    o_par, S_par = core(q, k, v, x, state, output_state=True)
    o_rec, S_rec = core.recurrent(q, k, v, x, state)
    assert o_par.shape == (B, T, H, D) and torch.isfinite(o_par).all()
    assert rel(o_par, o_rec) < 1e-6
    assert torch.equal(S_par.seen, S_rec.seen) and S_par.seen.tolist() == [3 + T, window + 4 + T]
    for a, b in zip(state_tensors(S_par), state_tensors(S_rec), strict=True):
        assert close(a, b)
    grad_o = torch.randn_like(o_rec)
    grad_S = [torch.randn_like(t) for t in state_tensors(S_rec) if t.is_floating_point()]  # (empty ones too)

    def grads(o, S):
        floats = [t for t in state_tensors(S) if t.is_floating_point()]
        loss = (o * grad_o).sum() + sum((t * g).sum() for t, g in zip(floats, grad_S, strict=True))
        return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)

    for g_par, g_rec in zip(grads(o_par, S_par), grads(o_rec, S_rec), strict=True):
        assert close(g_par, g_rec)
    with torch.no_grad():
        live = WindowState(*(t.detach().clone() for t in state))
        addresses = [t.data_ptr() for t in state_tensors(live)]
        steps = [core.step(*(t[:, i : i + 1] for t in (q, k, v, x)), live) for i in range(T)]
    assert [t.data_ptr() for t in state_tensors(live)] == addresses
    assert rel(torch.cat(steps, dim=1), o_rec) < 1e-6
    for a, b in zip(state_tensors(live), state_tensors(S_rec), strict=True):
        assert close(a, b.detach())


@each_preset
def test_a_prompt_in_pieces_then_tokens_equals_the_whole_sequence(name):
    """Generation: the parallel form on a prompt in two calls (the second continues from the state), then the
    decode step, token by token, equal the parallel form over the whole sequence."""
    core = windowed(name, 6)
    T = 40
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, T, C, dtype=torch.float64)
    whole, _ = core(q, k, v, x)
    first, state = core(q[:, :4], k[:, :4], v[:, :4], x[:, :4], output_state=True)  # fewer than W
    second, state = core(q[:, 4:21], k[:, 4:21], v[:, 4:21], x[:, 4:21], state, output_state=True)
    tokens = [core.step(*(t[:, i : i + 1] for t in (q, k, v, x)), state) for i in range(21, T)]
    assert rel(torch.cat([first, second, *tokens], dim=1), whole) < 1e-10


@each_preset
def test_pads_anywhere_give_each_row_what_it_gives_alone(name):
    """A pad is no key of the window, no write to the memory and no one of the W tokens: with pads leading,
    scattered and trailing, every form gives at the real tokens the outputs and final state of the row alone;
    parallel and recurrent agree on every gradient."""
    core = windowed(name, 5)
    T = 30
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    token_mask = torch.ones(B, T, dtype=torch.bool)
    token_mask[0, :9] = False  # left padding
    token_mask[1, [0, 4, 5, 17, 18, 19, T - 1]] = False  # pads anywhere
    o_par, S_par = core(q, k, v, x, output_state=True, token_mask=token_mask)
    o_rec, S_rec = core.recurrent(q, k, v, x, token_mask=token_mask)
    with torch.no_grad():
        live = core.allocate_state(B, q.device, torch.float64)
        steps = [
            core.step(*(t[:, i : i + 1] for t in (q, k, v, x)), live, token_mask[:, i : i + 1])
            for i in range(T)
        ]
        o_step = torch.cat(steps, dim=1)
        for row in range(B):
            real = token_mask[row]
            o_alone, S_alone = core.recurrent(*(t[row, real][None] for t in (q, k, v, x)))
            for form, (o, S) in {
                "parallel": (o_par, S_par),
                "recurrent": (o_rec, S_rec),
                "step": (o_step, live),
            }.items():
                assert rel(o[row, real], o_alone[0]) < 1e-6, (form, row)
                for a, b in zip(state_tensors(S), state_tensors(S_alone), strict=True):
                    assert close(a[row], b[0]), (form, row)
    grad_o = torch.randn_like(o_rec) * token_mask[:, :, None, None]  # a loss on the real tokens only
    inputs = [q, k, v, x, *core.parameters()]
    grad = lambda o, S: torch.autograd.grad(
        (o * grad_o).sum() + S.fast_weights.sum() + S.keys.sum(),
        inputs,
        allow_unused=True,
        materialize_grads=True,
    )
    for g_p, g_r in zip(grad(o_par, S_par), grad(o_rec, S_rec), strict=True):
        assert close(g_p, g_r)


@each_preset
def test_the_allocated_state_is_the_state_before_any_token_and_state_bytes_counts_the_buffer(name):
    core = windowed(name, 8)
    q, k, v = (torch.randn(B, 20, H, D, dtype=torch.float64) for _ in range(3))
    x = torch.randn(B, 20, C, dtype=torch.float64)
    state = core.allocate_state(B, q.device, torch.float64)
    assert isinstance(state, WindowState) and not any(t.any() for t in state_tensors(state))
    o_none, S_none = core(q, k, v, x, output_state=True)
    o_alloc, S_alloc = core(q, k, v, x, state, output_state=True)
    assert rel(o_alloc, o_none) < 1e-12
    for a, b in zip(state_tensors(S_alloc), state_tensors(S_none), strict=True):
        assert close(a, b, 1e-12)
    state32 = core.allocate_state(3, q.device, torch.bfloat16)
    assert state32.fast_weights.dtype == state32.keys.dtype == torch.float32
    assert core.state_bytes(3, 1) == core.state_bytes(3, 5000) == state_nbytes(state32)
    without = build(preset(name, chunk_size=CHUNK)).state_bytes(3, 1)
    assert core.state_bytes(3, 1) > without  # the ring buffer


def tiny_gpt2(layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=64,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    net = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for block in net.transformer.h:
            block.attn.c_attn.weight.mul_(4.0)  # peaked attention, as in a trained model
    return net


@each_preset
def test_right_after_conversion_every_position_before_w_is_the_pretrained_model(name):
    """The required property: converted with attention.window=W and nothing trained, each layer's output at
    every t < W is GPT-2's softmax attention (so the logits are GPT-2's there, to float64 rounding); from W
    on, the memory takes part and the logits differ."""
    W, T = 8, 20
    pretrained = tiny_gpt2()
    converted = tiny_gpt2()
    node = preset(
        name, chunk_size=CHUNK, window=W, **({} if name in ("hedgehog", "delta") else {"state_size": 16})
    )
    convert_attention(converted, core_factory(node))
    converted.double().eval()
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    outputs: dict[str, list[torch.Tensor]] = {"pretrained": [], "converted": []}
    for key, net in (("pretrained", pretrained), ("converted", converted)):
        hooks = [
            block.attn.register_forward_hook(lambda _m, _i, out, key=key: outputs[key].append(out[0]))
            for block in net.transformer.h
        ]
        with torch.no_grad():
            outputs[key].append(net(ids, use_cache=False).logits)
        for hook in hooks:
            hook.remove()
    for layer, (a, b) in enumerate(zip(outputs["converted"], outputs["pretrained"], strict=True)):
        assert rel(a[:, :W], b[:, :W]) < 1e-12, layer  # layer outputs, then the logits
    assert rel(outputs["converted"][-1][:, W:], outputs["pretrained"][-1][:, W:]) > 1e-6


@pytest.mark.parametrize("window", [0, -3, 2.5, "16", True])
def test_a_window_that_is_not_a_positive_integer_is_one_config_error(window):
    with pytest.raises(ConfigError, match="attention.window must be a positive integer .* or null"):
        build(preset("decay", window=window))


def test_softmax_refuses_a_window():
    with pytest.raises(ConfigError, match="attention.window=16 applies to the fast-weight presets"):
        build(preset("softmax", window=16))
    build(preset("softmax"))  # window: null is no window


def test_an_export_round_trips_the_window_and_the_memory_weight(tmp_path):
    """The window is an option of the exported attention node, and alpha_h a state-dict entry: the loaded
    model is the exported one, logits and generation state alike."""
    from dfw.loading import load_exported
    from dfw.model import export

    net = tiny_gpt2()
    node = preset("decay", chunk_size=CHUNK, window=4, state_size=16)
    convert_attention(net, core_factory(node))
    with torch.no_grad():
        for block in net.transformer.h:
            block.attn.core.memory_weight.uniform_(0.5, 1.5)
    net = net.float().eval()
    loaded = load_exported(export(net, node, tmp_path / "model")).eval()
    assert all(block.attn.core.window == 4 for block in loaded.transformer.h)
    assert "transformer.h.1.attn.core.memory_weight" in loaded.state_dict()
    ids = torch.randint(0, 50, (B, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, net(ids, use_cache=False).logits)
