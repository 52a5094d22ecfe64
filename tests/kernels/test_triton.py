"""The chunked Triton kernel (kernel="triton") against the float64 reference.

Without a GPU it runs in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports Triton when torch sees no CUDA device. Small shapes there (the interpreter runs every program
in NumPy); float32 and float16 inputs only: the interpreter's tl.dot on bfloat16 operands is wrong
(bfloat16 is covered by the ahead-of-time compile test and the GPU tests, marked `gpu`).
Outputs, final state and every gradient, the initial state's included, with NaN-poisoned outputs;
T not a multiple of the chunk (64) or sub-chunk (16); gates near 0, near 1 and mixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import dfw_kernels
import pytest
import torch
from dfw_kernels import (
    KernelUnavailable,
    backend,
    chunk_decay_fast_weights,
    decay_fast_weights,
    recurrent_decay_fast_weights,
)
from dfw_kernels.closed_form import scan_reference
from dfw_kernels.testing import poisoned_outputs, random_inputs, relative_rms_error
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

triton_chunk = pytest.importorskip("dfw_kernels.triton_chunk")
if triton_chunk.triton is None:
    pytest.skip("Triton is not installed (make install brings it on Linux x86_64)", allow_module_level=True)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernel = pytest.mark.skipif(
    not ON_GPU and not triton_chunk.interpreting(),
    reason="needs a GPU, or TRITON_INTERPRET=1 set before Triton is imported (tests/conftest.py does)",
)
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")

# Relative RMS error against float64. 16-bit inputs feed the tensor cores 16-bit operands (the decayed
# q, k, v and the state), rounded once each; float32 products are IEEE.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def poison_outputs():
    with poisoned_outputs():
        yield


def _reference_and_kernel(inputs, output_final_state=True):
    """(float64 reference results, kernel results): o, final state and the gradient of every input."""
    leaves = [n for n, x in inputs.items() if x is not None]
    reference_inputs = {
        n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()
    }
    g = torch.Generator(device=DEVICE)
    results = []
    for ins, extra in ((reference_inputs, {}), (inputs, {"kernel": "triton"})):
        fn = chunk_decay_fast_weights if not extra else decay_fast_weights
        o, final = fn(**ins, output_final_state=output_final_state, **extra)
        g.manual_seed(7)
        outputs = [o]
        grad_outputs = [torch.randn(o.shape, generator=g, device=DEVICE, dtype=torch.float64).to(o.dtype)]
        if output_final_state:
            outputs.append(final)
            grad_outputs.append(
                torch.randn(final.shape, generator=g, device=DEVICE, dtype=torch.float64).to(final.dtype)
            )
        grads = torch.autograd.grad(outputs, [ins[n] for n in leaves], grad_outputs)
        results.append(
            {"o": o, "final_state": final, **{f"d{n}": dx for n, dx in zip(leaves, grads, strict=True)}}
        )
    return results


def _assert_close(expected, actual, tol):
    for name in expected:
        if expected[name] is None:
            assert actual[name] is None, name
            continue
        error = relative_rms_error(actual[name], expected[name])
        assert error < tol, f"{name}: relative RMS error {error:.2e} (tolerance {tol:.0e})"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
def test_matches_float64_reference(gates, dtype):
    """T = 100: one full chunk and a partial one (2 of 4 sub-chunks, the last one partial)."""
    inputs = random_inputs(1, 100, 2, 32, 16, gates=gates, dtype=dtype, device=DEVICE, seed=3)
    expected, actual = _reference_and_kernel(inputs)
    _assert_close(expected, actual, TOL[dtype])


VARIANTS = [
    "no_initial_state",
    "no_final_state",
    "key_gate_only",
    "value_gate_only",
    "no_gates",
    "scalar_gates",
    "odd_sizes_two_value_blocks",
    "one_token",
    "one_full_chunk",
]


@needs_kernel
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(variant):
    shape = {
        "odd_sizes_two_value_blocks": (1, 21, 1, 20, 72),
        "one_token": (2, 1, 2, 16, 16),
        "one_full_chunk": (1, 64, 1, 16, 16),
    }.get(variant, (1, 37, 2, 16, 16))
    inputs = random_inputs(
        *shape, device=DEVICE, dtype=torch.float32, initial_state=variant != "no_initial_state"
    )
    if variant in ("value_gate_only", "no_gates"):
        inputs["log_key_gate"] = None
    if variant in ("key_gate_only", "no_gates"):
        inputs["log_value_gate"] = None
    if variant == "scalar_gates":
        for name in ("log_key_gate", "log_value_gate"):
            inputs[name] = inputs[name][..., :1].detach().requires_grad_()
    expected, actual = _reference_and_kernel(inputs, output_final_state=variant != "no_final_state")
    _assert_close(expected, actual, TOL[torch.float32])


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_its_specification(reverse):
    """The primitive itself, every output at once: out, out_pre, both final states, the epilogue."""
    B, T, H, K, V = 1, 70, 2, 16, 32
    x = {n: t.detach() for n, t in random_inputs(B, T, H, K, V, dtype=torch.float32, device=DEVICE).items()}
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x1, x2 = (torch.randn(B, T, H, V, generator=gen, device=DEVICE) for _ in range(2))
    start = torch.randn(B, H, V, generator=gen, device=DEVICE)
    s0 = torch.randn(B, H, V, K, generator=gen, device=DEVICE).transpose(-1, -2)  # strided [B, H, K, V]
    kwargs = dict(reverse=reverse, output_pre=True, output_final_state=True, output_final_pre_state=True)
    names = ("q", "k", "v", "log_key_gate", "log_value_gate")
    actual = triton_chunk.triton_scan(
        *(x[n] for n in names), s0, out_dtype=torch.float32, gate_grad_inputs=(x1, x2, start), **kwargs
    )
    expected = scan_reference(
        *(x[n].double() for n in names),
        s0.double(),
        out_dtype=torch.float64,
        gate_grad_inputs=(x1.double(), x2.double(), start.double()),
        **kwargs,
    )
    for name in expected._fields:
        error = relative_rms_error(getattr(actual, name), getattr(expected, name))
        assert error < TOL[torch.float32], f"{name}: relative RMS error {error:.2e}"


@pytest.mark.skipif(ON_GPU, reason="checks CPU tensors")
def test_cpu_tensors_without_the_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setattr(triton_chunk, "interpreting", lambda: False)
    backend.forget()  # resolutions made with the interpreter on
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 1, 4, 4, dtype=torch.float32).items()}
    with pytest.raises(KernelUnavailable, match="kernel='triton' cannot run: .*TRITON_INTERPRET=1"):
        decay_fast_weights(**inputs, kernel="triton")
    assert "TRITON_INTERPRET=1" in dfw_kernels.unavailable_reason("triton", "cpu")
    backend.forget()


def test_unsupported_inputs_fail_clearly():
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 1, 4, 4).items()}  # float64
    with pytest.raises(KernelUnavailable, match="kernel='triton' cannot run: .*float64"):
        decay_fast_weights(**inputs, kernel="triton")
    inputs = {n: x.detach() for n, x in random_inputs(1, 5, 1, 4, 130, dtype=torch.float32).items()}
    with pytest.raises(KernelUnavailable, match="kernel='triton' cannot run: .*up to 128, got 4 and 130"):
        decay_fast_weights(**inputs, kernel="triton")


AOT_RUNS = [  # (arch, arguments of `python -m dfw_kernels aot`, kernels compiled)
    (90, ["--dtype", "bfloat16", "float32", "--size", "64"], 10),  # the GPT-2 training shape, both directions
    (90, ["--dtype", "bfloat16", "--size", "128"], 5),
    (90, ["--dtype", "bfloat16", "--size", "64", "--variant", "no-gates"], 4),  # the kernels' other branches
    (80, ["--dtype", "bfloat16", "--size", "64", "--direction", "forward"], 2),
]


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80_without_spilling_at_the_gpt2_shape(tmp_path):
    """`python -m dfw_kernels aot`: triton.compile for CUDA targets without a GPU, at the GPT-2 training
    shape, which checks what the interpreter does not (tl.dot's shape and dtype rules, shared memory)
    and reads ptxas's resource report: registers, stack frame and spills per kernel, printed here.
    Fails if a kernel spills at state_size = head_size = 64 (bfloat16 and float32, both directions; 128
    is reported and its shared memory checked). About 35 s of CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for index, (arch, arguments, kernels) in enumerate(AOT_RUNS):
        out = tmp_path / f"aot{index}.json"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "dfw_kernels",
                "aot",
                "--arch",
                str(arch),
                *arguments,
                "--fail-on-spill",
                "64",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        print(run.stdout)  # the register and spill table (pytest -s, or -rP, shows it)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        reports = json.loads(out.read_text())
        assert len(reports) == kernels
        for r in reports:
            assert r["registers"] > 0 and r["arch"] == arch, r
            assert 0 <= r["shared_bytes"] <= (227 if arch == 90 else 163) * 1024, r
            if r["state_size"] == 64:
                assert r["spill_stores"] == r["spill_loads"] == r["stack_bytes"] == 0, r


@pytest.mark.skipif(
    not triton_chunk.interpreting(),
    reason="trains on CPU, so needs Triton's interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.slow
def test_trains_a_converted_model_like_kernel_torch(tmp_path, text_files, monkeypatch):
    """Two steps of the real pipeline (tiny GPT-2, attention=decay, state size 16 to keep the interpreter
    quick): the same losses and perplexities as kernel=torch."""
    from dfw.train import train
    from tests.conftest import compose, tiny_overrides

    calls = []
    scan = triton_chunk.triton_scan

    def counted_scan(*args, **kwargs):
        calls.append(1)
        return scan(*args, **kwargs)

    monkeypatch.setattr(triton_chunk, "triton_scan", counted_scan)
    metrics = {}
    for kernel in ("torch", "triton"):
        overrides = tiny_overrides(
            tmp_path / kernel,
            text_files,
            "attention=decay",
            f"attention.kernel={kernel}",
            "attention.state_size=16",
            "data.batch_size=2",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "module.scheduler.num_training_steps=2",
            "test=false",
        )
        metrics[kernel] = train(compose(*overrides))
        assert bool(calls) == (kernel == "triton")  # the Triton kernel ran, and only when asked for
    for key in ("train/loss", "val/ppl_converted", "val/ppl"):
        actual, expected = (torch.tensor(float(metrics[kernel][key])) for kernel in ("triton", "torch"))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=0, msg=key)


# On a GPU (kernels/gpu_check.sh): the production shapes, bfloat16 included.
GPU_SHAPES = [(8, 77, 12, 64, 64), (8, 1024, 12, 64, 64), (2, 300, 4, 128, 128), (2, 1000, 3, 64, 32)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gates", ["near_one", "near_zero", "mixed"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-T{}-H{}-K{}-V{}".format(*s))
def test_gpu_production_shapes(shape, gates, dtype):
    inputs = random_inputs(*shape, gates=gates, dtype=dtype, device=DEVICE, seed=sum(shape))
    expected, actual = _reference_and_kernel(inputs)
    _assert_close(expected, actual, TOL[dtype])


class PeakAllocated(TorchDispatchMode):
    """Counts the bytes of every storage a torch op allocates inside it, freed when the storage dies,
    and keeps the peak: torch.cuda.max_memory_allocated for CPU tensors. Storages of `existing` tensors
    (the inputs, made before) are not counted when ops return views of them."""

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.live and key not in self.existing:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.current -= self.live.pop(key)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _peak_of_fwd_bwd(B, T, H, D):
    inputs = random_inputs(B, T, H, D, D, dtype=torch.bfloat16)
    with PeakAllocated(existing=[x for x in inputs.values() if x is not None]) as memory:
        o, final = decay_fast_weights(**inputs, output_final_state=True, kernel="triton")
        (o.float().square().sum() + final.square().sum()).backward()
    return memory.peak


@pytest.mark.skipif(not triton_chunk.interpreting(), reason="counts CPU allocations: needs the interpreter")
def test_no_per_step_state_in_memory_as_allocated_on_cpu(monkeypatch):
    """test_cuda.py's test_no_per_step_state_in_memory[triton] (fwd + bwd at T = 8192, bf16: the per-step
    states would be 512 MiB, the bound is a quarter), with every torch allocation counted on CPU. The
    kernels allocate nothing themselves: at a small shape the interpreted launches allocate what
    launches that run nothing do, so the full shape runs with no-op launches (seconds, not hours).
    The chunk-local cumulative sums of float64 log-gates this path used to make peaked at 144 MiB."""
    interpreted = _peak_of_fwd_bwd(1, 70, 1, 32)
    for name in ("_chunk_states_kernel", "_chunk_output_kernel", "_gate_grad_prefix_kernel"):
        monkeypatch.setattr(triton_chunk, name, _NoLaunch())
    assert _peak_of_fwd_bwd(1, 70, 1, 32) == interpreted
    B, T, H, D = 1, 8192, 4, 64
    peak = _peak_of_fwd_bwd(B, T, H, D)
    per_step_states = B * T * H * D * D * 4
    assert peak < per_step_states / 4, f"peak {peak / 2**20:.1f} MiB"


@needs_kernel
def test_minus_infinity_log_gate_gives_the_loops_result():
    """A gate of exactly 0 (log-gate -inf, or below -1e37): the loop resets the state and stays finite; the
    kernel's chunk-local cumulative sums would take -inf - -inf = NaN without the log-gate floor."""
    inputs = random_inputs(1, 40, 2, 16, 16, device=DEVICE, dtype=torch.float32)
    with torch.no_grad():
        inputs["log_key_gate"][0, 5, 0, :3] = float("-inf")
        inputs["log_value_gate"][0, 17, 1] = -1e38
        inputs["log_key_gate"][0, 30, 1, 2] = float("-inf")
    inputs = {n: None if x is None else x.detach().requires_grad_() for n, x in inputs.items()}
    expected = recurrent_decay_fast_weights(
        **{n: None if x is None else x.detach().double() for n, x in inputs.items()}, output_final_state=True
    )
    o, final = decay_fast_weights(**inputs, output_final_state=True, kernel="triton")
    (o.square().sum() + final.square().sum()).backward()
    grads = {f"d{n}": t.grad for n, t in inputs.items() if t is not None}
    for name, x in {"o": o, "final_state": final, **grads}.items():
        assert torch.isfinite(x).all(), f"{name} has NaN or inf"
    assert relative_rms_error(o, expected[0]) < TOL[torch.float32]
    assert relative_rms_error(final, expected[1]) < TOL[torch.float32]
