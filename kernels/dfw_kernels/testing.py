"""Helpers shared by the kernel tests, the GPU checks and the benchmark: inputs and the error measure."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _common

GATE_REGIMES = ("near_one", "near_zero", "mixed")


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside it, every output the CUDA and Triton kernels write is NaN-filled before they run, so an
    element a kernel forgets cannot pass a test (a pytest fixture wraps each kernel test in it)."""
    saved, _common.POISON_OUTPUTS = _common.POISON_OUTPUTS, True
    try:
        yield
    finally:
        _common.POISON_OUTPUTS = saved


def relative_rms_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if `actual` has a NaN or inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def random_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    gates: str = "mixed",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    initial_state: bool = True,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Keyword arguments of `decay_fast_weights`, every tensor a leaf that requires grad.

    q, k, v in `dtype`; log-gates in float32 (float64 for float64) as the attention module makes them;
    the initial state in the accumulation dtype. gates: "near_one" (log-gate ~ -1e-3), "near_zero"
    (gates 1e-3 .. 7e-3), or "mixed" (sigmoid of N(2, 3^2): a spread from ~1e-4 to ~1 over channels).
    """
    if gates not in GATE_REGIMES:
        raise ValueError(f"gates must be one of {GATE_REGIMES}, got {gates!r}")
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    q, k, v = randn(B, T, H, K) * K**-0.5, randn(B, T, H, K) * K**-0.5, randn(B, T, H, V)
    if gates == "near_one":
        log_gates = [-1e-3 * rand(B, T, H, D) for D in (K, V)]
    elif gates == "near_zero":
        log_gates = [-(5.0 + 2.0 * rand(B, T, H, D)) for D in (K, V)]
    else:
        log_gates = [F.logsigmoid(3.0 * randn(B, T, H, D) + 2.0) for D in (K, V)]
    gate_dtype = torch.promote_types(dtype, torch.float32)
    inputs = {
        "q": q.to(dtype),
        "k": k.to(dtype),
        "v": v.to(dtype),
        "log_key_gate": log_gates[0].to(gate_dtype),
        "log_value_gate": log_gates[1].to(gate_dtype),
        "initial_state": (0.5 * randn(B, H, K, V)).to(gate_dtype) if initial_state else None,
    }
    return {name: None if x is None else x.to(device).requires_grad_() for name, x in inputs.items()}
