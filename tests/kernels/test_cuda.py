"""The CUDA kernel against the float64 reference (run on a machine with an NVIDIA GPU).

Outputs, final state and every gradient, the initial state's included; relative RMS error < 1e-5 in
float32 and < 5e-3 in bfloat16 (float16: 2e-3); T not a multiple of any tile (the kernel's chunks are
16 or 32 steps), D in {32, 64, 128}, gates near 0, near 1 and mixed. Every output buffer is NaN-filled
before the kernel runs (dfw_kernels.testing.poisoned_outputs), so an element the kernel forgets cannot pass.
Run with `kernels/gpu_check.sh` (or `pytest -m gpu tests/kernels`).
"""

from __future__ import annotations

import pytest
import torch
from dfw_kernels import chunk_decay_fast_weights, cuda, decay_fast_weights, decay_fast_weights_step
from dfw_kernels.closed_form import scan_reference
from dfw_kernels.testing import poisoned_outputs, random_inputs, relative_rms_error

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
def poison_outputs():
    with poisoned_outputs():
        yield


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


@pytest.mark.parametrize(
    "variant",
    [
        "no_initial_state",
        "no_final_state",
        "key_gate_only",
        "value_gate_only",
        "scalar_gates",
        "odd_sizes",
        "non_contiguous",
    ],
)
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
    kwargs = dict(
        reverse=reverse,
        output_pre=True,
        output_final_state=True,
        output_final_pre_state=True,
        gate_grad_inputs=(x1, x2, start),
    )
    actual = cuda.cuda_scan(
        x["q"], x["k"], x["v"], x["log_key_gate"], x["log_value_gate"], s0, out_dtype=dtype, **kwargs
    )
    as64 = lambda t: t.double()
    expected = scan_reference(
        as64(x["q"]),
        as64(x["k"]),
        as64(x["v"]),
        as64(x["log_key_gate"]),
        as64(x["log_value_gate"]),
        as64(s0),
        out_dtype=torch.float64,
        **{**kwargs, "gate_grad_inputs": (as64(x1), as64(x2), as64(start))},
    )
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


@pytest.mark.parametrize("kernel", ["cuda", "triton"])  # triton: the chunked kernel, triton_chunk.py
def test_no_per_step_state_in_memory(kernel):
    """fwd + bwd at T = 8192: the per-step states would be 512 MiB; the kernel stays far below."""
    B, T, H, D = 1, 8192, 4, 64
    inputs = random_inputs(B, T, H, D, D, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, final = decay_fast_weights(**inputs, output_final_state=True, kernel=kernel)
    (o.float().square().sum() + final.square().sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    per_step_states = B * T * H * D * D * 4
    assert peak < per_step_states / 4, f"peak {peak / 2**20:.1f} MiB"


# --- Shapes and paths that real models take (issue 10, item 3) ------------------------------------------


def _check_against_reference(inputs, dtype, **kwargs):
    expected, actual = _reference_and_kernel(inputs, kernel="cuda", **kwargs)
    for name in expected:
        if expected[name] is None:
            assert actual[name] is None, name
            continue
        error = relative_rms_error(actual[name], expected[name])
        assert error < TOL[dtype], f"{name}: relative RMS error {error:.2e} (tolerance {TOL[dtype]:.0e})"


def test_gpt2_training_shape_takes_the_wide_tile_and_large_shared_memory():
    """B = 8, T = 77, H = 12, K = V = 64 in bf16: 4 * 96 = 384 blocks, so the BV = 16 tile, whose two
    buffers take ~50 KB of shared memory (over the 48 KB default: the opt-in attribute must work)."""
    inputs = random_inputs(8, 77, 12, 64, 64, dtype=torch.bfloat16, device="cuda", seed=11)
    if (64 // 16) * 12 * 8 < 2 * torch.cuda.get_device_properties(0).multi_processor_count:
        pytest.skip("this GPU has too many SMs for this shape to pick the wide tile")
    _check_against_reference(inputs, torch.bfloat16)


@pytest.mark.parametrize("T, K", [(32, 64), (64, 64), (96, 32), (16, 128), (128, 128)])
def test_lengths_that_are_multiples_of_the_chunk(T, K):
    """The scan copies 32 tokens per chunk (16 for K = 128): T a multiple of it ends on a full chunk."""
    _check_against_reference(random_inputs(2, T, 3, K, 64, device="cuda", dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("K, V", [(8, 64), (16, 64), (16, 8), (64, 8)])
def test_small_key_and_value_sizes(K, V):
    """K <= 16 takes the KP = 16 template; V = 8 the narrow (BV = 8) tile."""
    for dtype in (torch.float32, torch.bfloat16):
        _check_against_reference(random_inputs(2, 50, 3, K, V, device="cuda", dtype=dtype, seed=K + V), dtype)


@pytest.mark.parametrize("gates", ["scalar", "absent", "key_only_scalar"])
def test_scalar_and_absent_gates_in_bf16(gates):
    inputs = random_inputs(2, 45, 3, 64, 64, dtype=torch.bfloat16, device="cuda", seed=5)
    if gates == "scalar":
        for name in ("log_key_gate", "log_value_gate"):
            inputs[name] = inputs[name][..., :1].detach().requires_grad_()
    elif gates == "absent":
        inputs["log_key_gate"] = inputs["log_value_gate"] = None
    else:
        inputs["log_key_gate"] = inputs["log_key_gate"][..., :1].detach().requires_grad_()
        inputs["log_value_gate"] = None
    _check_against_reference(inputs, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_with_gradients(dtype):
    """q, k, v as views of one fused projection and a transposed gate: every gradient reaches the fused
    tensor."""
    B, T, H, D = 2, 45, 3, 64
    inputs = random_inputs(B, T, H, D, D, dtype=dtype, device="cuda", seed=2)
    fused = torch.cat([inputs[n].detach() for n in ("q", "k", "v")], dim=-1).requires_grad_()  # (B, T, H, 3D)
    gate = inputs["log_key_gate"].detach().transpose(1, 2).contiguous().requires_grad_()  # (B, H, T, D)
    q, k, v = fused.split(D, dim=-1)
    args = dict(
        log_key_gate=gate.transpose(1, 2),
        log_value_gate=inputs["log_value_gate"].detach(),
        initial_state=inputs["initial_state"].detach(),
        output_final_state=True,
    )
    assert not q.is_contiguous() and not args["log_key_gate"].is_contiguous()
    ref = {n: x.double() if torch.is_tensor(x) else x for n, x in args.items()}
    o_ref, final_ref = chunk_decay_fast_weights(q.double(), k.double(), v.double(), **ref)
    o, final = decay_fast_weights(q, k, v, **args, kernel="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(o.shape, generator=g, device="cuda")
    expected = torch.autograd.grad((o_ref * do.double()).sum() + final_ref.sum(), [fused, gate])
    actual = torch.autograd.grad((o.float() * do).sum() + final.sum(), [fused, gate])
    assert relative_rms_error(o, o_ref) < TOL[dtype]
    for name, a, e in zip(("fused q|k|v", "key gate"), actual, expected, strict=True):
        assert relative_rms_error(a, e) < TOL[dtype], name


def test_no_tokens():
    inputs = random_inputs(2, 0, 3, 64, 64, dtype=torch.bfloat16, device="cuda")
    o, final = decay_fast_weights(**inputs, output_final_state=True, kernel="cuda")
    assert o.shape == (2, 0, 3, 64)
    torch.testing.assert_close(final, inputs["initial_state"].float(), rtol=0, atol=0)


@pytest.mark.parametrize("V", [65, 64])
def test_decode_step_with_the_denominator_column(V):
    """V = D + 1 (linear, performer, rfa, t2r keep a normaliser column): the kernel runs on a padded state."""
    B, H, K = 3, 2, 64
    x = {n: t.detach() for n, t in random_inputs(B, 6, H, K, V, device="cuda", dtype=torch.bfloat16).items()}
    state, expected_state = x["initial_state"].clone(), x["initial_state"].double()
    for t in range(6):
        token = [x[n][:, t] for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]
        o = decay_fast_weights_step(*token, state, kernel="cuda")
        expected = decay_fast_weights_step(*(y.double() for y in token), expected_state, kernel="torch")
        assert relative_rms_error(o, expected) < TOL[torch.bfloat16]
    assert relative_rms_error(state, expected_state) < 1e-5


def test_opcheck_both_custom_ops():
    """Schema, fake (meta) implementations and dispatch of torch.ops.dfw_kernels.scan and .step."""
    x = {
        n: t.detach() for n, t in random_inputs(2, 37, 3, 64, 32, dtype=torch.bfloat16, device="cuda").items()
    }
    gates = (x["log_key_gate"], x["log_value_gate"])
    # q, k, v, gates, initial state, no gate-gradient inputs, forward, and every output
    scan_args = (
        x["q"],
        x["k"],
        x["v"],
        *gates,
        x["initial_state"],
        None,
        None,
        None,
        False,
        True,
        True,
        True,
        True,
    )
    torch.library.opcheck(torch.ops.dfw_kernels.scan.default, scan_args)
    token = [x[n][:, :1].contiguous() for n in ("q", "k", "v", "log_key_gate", "log_value_gate")]
    torch.library.opcheck(torch.ops.dfw_kernels.step.default, (*token, x["initial_state"].clone()))


def test_compiled_converted_layer_runs_in_one_graph():
    """torch.compile(fullgraph=True) of a decay layer on the CUDA kernel: no graph break (the ops are
    opaque to Dynamo; the 16-byte alignment test runs inside them), same output and gradients as eager."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dfw.model import core_factory

    node = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "attention" / "decay.yaml")
    node.kernel = "cuda"
    torch.manual_seed(0)
    core = core_factory(node)(hidden_size=768, num_heads=12, head_dim=64, layer_idx=0).cuda()
    B, T, H, D = 2, 77, 12, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", requires_grad=True) for _ in range(3))
    x = torch.randn(B, T, H * D, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(core, fullgraph=True)
    results = []
    for layer in (core, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o, _ = layer(q, k, v, x)
        grads = torch.autograd.grad(o.float().square().mean(), [q, k, v, x])
        results.append((o, *grads))
    for eager, compiled_result in zip(*results, strict=True):
        assert relative_rms_error(compiled_result, eager) < 1e-2
