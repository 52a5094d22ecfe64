"""The CUDA scan: built on first use, exposed as torch.library custom ops, differentiated in closed form.

Building. `load_extension()` compiles csrc/binding.cpp and csrc/dfw_scan.cu with
torch.utils.cpp_extension (ninja, cached: later processes load the cached build in about a second).
Ahead of time: `python -m dfw_kernels` builds it now; with DFW_KERNELS_BUILD_DIR set, the build
goes to (and is later loaded from) that folder, e.g. one baked into a container image. Importing this
module never builds or touches the GPU; `unavailable_reason()` says why the kernel cannot run here
(backend.py asks it, once per device, dtype and sizes, before a call takes this path).

Ops. `torch.ops.dfw_kernels.scan` (functional) and `torch.ops.dfw_kernels.step` (updates a state in
place), with fake implementations for torch.compile. The autograd is `ScanDecayFastWeights` from
closed_form.py, run with `cuda_scan`: one scan forward, three scans backward.
"""

import os
from pathlib import Path
from typing import overload

import torch
from torch import Tensor

from ._common import DTYPES, MAX_STATE_DIM, KernelUnavailable, full_width, input_dtype, new_output, pad_last
from .closed_form import ScanDecayFastWeights, ScanResult

__all__ = [
    "DTYPES",
    "MAX_STATE_DIM",
    "KernelUnavailable",
    "decay_fast_weights_cuda",
    "decay_fast_weights_step_cuda",
    "load_extension",
    "unavailable_reason",
]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "binding.cpp", CSRC / "dfw_scan.cu")
BUILD_DIR_ENV = "DFW_KERNELS_BUILD_DIR"
# dfw::kStateDimMultiple: other state sizes are zero-padded here (MAX_STATE_DIM is dfw::kMaxStateDim).
STATE_DIM_MULTIPLE = 8
MIN_CAPABILITY = (8, 0)  # cp.async

_extension = None
_build_error: str | None = None
_build_attempts = 0
MAX_BUILD_ATTEMPTS = 2  # a failed build is tried once more (a lock left by a killed build, a full /tmp)
build_generation = 0  # counts clear_build_error() calls: backend.py resolves again after one


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run on `device` (default: the current CUDA device), or None if it can.

    Cheap: never builds. A build failure is reported by load_extension.
    """
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found to build the kernel; install it or set CUDA_HOME"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"the kernel needs compute capability 8.0 or newer (cp.async), this GPU has {major}.{minor}"
    if _build_error is not None and _build_attempts >= MAX_BUILD_ATTEMPTS:
        return _build_error
    return None


def clear_build_error() -> None:
    """Forget a failed build, so that the next call of load_extension() (and of decay_fast_weights, which
    had fallen back to PyTorch) tries again."""
    global _build_error, _build_attempts, build_generation
    _build_error, _build_attempts = None, 0
    build_generation += 1


def load_extension(verbose: bool = False):
    """The compiled extension, built on first call (cached across processes). Raises KernelUnavailable.

    A failed build is tried once more on the next call, then its error is kept for the life of the
    process (every later call raises at once); `clear_build_error()` allows another try.
    """
    global _extension, _build_error, _build_attempts
    if _extension is not None:
        return _extension
    if _build_error is not None and _build_attempts >= MAX_BUILD_ATTEMPTS:
        raise KernelUnavailable(_build_error)
    from torch.utils.cpp_extension import load

    build_dir = os.environ.get(BUILD_DIR_ENV)
    if build_dir:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    _build_attempts += 1
    try:
        _extension = load(
            name="dfw_kernels_scan",
            sources=[str(s) for s in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=build_dir or None,
            verbose=verbose,
        )
    except Exception as error:  # the compiler's message is in `error`
        _build_error = (
            f"the CUDA kernel failed to build ({_build_attempts} of {MAX_BUILD_ATTEMPTS} attempts; "
            f"dfw_kernels.cuda.clear_build_error() allows another): {type(error).__name__}: {error}"
        )
        raise KernelUnavailable(_build_error) from error
    _build_error = None
    return _extension


@torch.library.custom_op("dfw_kernels::scan", mutates_args=(), device_types="cuda")
def scan_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None,
    log_value_gate: Tensor | None,
    initial_state: Tensor | None,
    gate_grad_x1: Tensor | None,
    gate_grad_x2: Tensor | None,
    gate_grad_start: Tensor | None,
    reverse: bool,
    output: bool,
    output_pre: bool,
    output_final_state: bool,
    output_final_pre_state: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, out_pre, final_state, final_pre_state, gate_grad); empty tensors for those not asked for.

    The scan of closed_form.scan_reference. q, k [B, T, H, K], v [B, T, H, V] in one of DTYPES (any
    strides: copied here unless contiguous and 16-byte aligned); log-gates float32 or None; states
    [B, H, K, V] float32 (any strides). K and V multiples of 8 up to 128. The gate-gradient epilogue runs
    when gate_grad_x1 and gate_grad_x2 are given.
    """
    q, k, v = (_aligned(x) for x in (q, k, v))
    log_key_gate, log_value_gate, gate_grad_x1, gate_grad_x2, gate_grad_start = (
        _aligned(x) for x in (log_key_gate, log_value_gate, gate_grad_x1, gate_grad_x2, gate_grad_start)
    )
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = torch.float32
    out = new_output((B, T, H, V), q.dtype, q) if output else None
    out_pre = new_output((B, T, H, V), f32, q) if output_pre else None
    final = new_output((B, H, K, V), f32, q) if output_final_state else None
    final_pre = new_output((B, H, K, V), f32, q) if output_final_pre_state else None
    with_gate_grad = gate_grad_x1 is not None and gate_grad_x2 is not None
    gate_grad = new_output((B, T, H, V), f32, q) if with_gate_grad else None
    with torch.cuda.device(q.device):
        load_extension().scan(
            q,
            k,
            v,
            log_key_gate,
            log_value_gate,
            initial_state,
            final,
            final_pre,
            out,
            out_pre,
            gate_grad,
            gate_grad_x1,
            gate_grad_x2,
            gate_grad_start,
            reverse,
            torch.cuda.current_stream(q.device).cuda_stream,
        )
    # The ops return a fixed number of tensors: an empty one stands for "not asked for".

    def or_empty(x: Tensor | None) -> Tensor:
        return x if x is not None else q.new_empty(0)

    return or_empty(out), or_empty(out_pre), or_empty(final), or_empty(final_pre), or_empty(gate_grad)


@scan_op.register_fake
def _(
    q,
    k,
    v,
    log_key_gate,
    log_value_gate,
    initial_state,
    gate_grad_x1,
    gate_grad_x2,
    gate_grad_start,
    reverse,
    output,
    output_pre,
    output_final_state,
    output_final_pre_state,
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = torch.float32
    with_gate_grad = gate_grad_x1 is not None and gate_grad_x2 is not None
    return (
        q.new_empty(B, T, H, V) if output else q.new_empty(0),
        q.new_empty(B, T, H, V, dtype=f32) if output_pre else q.new_empty(0),
        q.new_empty(B, H, K, V, dtype=f32) if output_final_state else q.new_empty(0),
        q.new_empty(B, H, K, V, dtype=f32) if output_final_pre_state else q.new_empty(0),
        q.new_empty(B, T, H, V, dtype=f32) if with_gate_grad else q.new_empty(0),
    )


@torch.library.custom_op("dfw_kernels::step", mutates_args=("state",), device_types="cuda")
def step_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None,
    log_value_gate: Tensor | None,
    state: Tensor,
) -> Tensor:
    """One token: state <- diag(a) state diag(b) + k^T v in place; returns q state.

    q, k [B, 1, H, K], v [B, 1, H, V] (any strides); log-gates float32 or None; state [B, H, K, V]
    float32 (any strides). Returns o [B, 1, H, V] in q's dtype.
    """
    q, k, v = (_aligned(x) for x in (q, k, v))
    log_key_gate, log_value_gate = (_aligned(x) for x in (log_key_gate, log_value_gate))
    out = new_output(v.shape, q.dtype, q)
    with torch.cuda.device(q.device):
        load_extension().scan(
            q,
            k,
            v,
            log_key_gate,
            log_value_gate,
            state,
            state,
            None,
            out,
            None,
            None,
            None,
            None,
            None,
            False,
            torch.cuda.current_stream(q.device).cuda_stream,
        )
    return out


@step_op.register_fake
def _(q, k, v, log_key_gate, log_value_gate, state):
    return torch.empty_like(v, dtype=q.dtype)


@overload
def _aligned(x: Tensor) -> Tensor: ...
@overload
def _aligned(x: None) -> None: ...
def _aligned(x: Tensor | None) -> Tensor | None:
    """Contiguous and 16-byte aligned (cp.async copies 16 bytes at a time), copying only if needed.

    Called inside the custom ops only: torch.compile sees the ops as opaque, so the data_ptr() test
    does not break its graph."""
    if x is None:
        return None
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def cuda_scan(
    q,
    k,
    v,
    log_key_gate,
    log_value_gate,
    initial_state,
    *,
    reverse=False,
    out_dtype=None,
    output_pre=False,
    output_final_state=False,
    output_final_pre_state=False,
    gate_grad_inputs=None,
) -> ScanResult:
    """closed_form.Scan on the GPU: the custom op, with its empty "not asked for" outputs as None."""
    x1 = x2 = start = None
    if gate_grad_inputs is not None:
        x1, x2, start = gate_grad_inputs
        x1, x2 = x1.float(), x2.to(q.dtype)
        start = None if start is None else start.float()
    out, out_pre, final, final_pre, gate_grad = scan_op(
        q,
        k.to(q.dtype),
        v.to(q.dtype),
        log_key_gate,
        log_value_gate,
        initial_state,
        x1,
        x2,
        start,
        reverse,
        out_dtype is not None,
        output_pre,
        output_final_state,
        output_final_pre_state,
    )
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return ScanResult(
        out=out if out_dtype is not None else None,
        out_pre=out_pre if output_pre else None,
        final_state=final if output_final_state else None,
        final_pre_state=final_pre if output_final_pre_state else None,
        gate_grad=gate_grad if gate_grad_inputs is not None else None,
    )


def _padded(q, k, v, log_key_gate, log_value_gate):
    """Inputs zero-padded to state sizes that are multiples of 8, in one dtype; gates full width, float32.

    Zero padding is exact: padded keys and queries are 0, padded gates are 1, padded values are 0.
    Returns q, k [B, T, H, state_size'], v [B, T, H, head_size'], gates of those widths.
    """
    state_size, head_size = q.shape[-1], v.shape[-1]
    dtype = input_dtype(q, k, v)
    padded_state_size, padded_head_size = (
        -(-size // STATE_DIM_MULTIPLE) * STATE_DIM_MULTIPLE for size in (state_size, head_size)
    )
    q, k = pad_last(q.to(dtype), padded_state_size), pad_last(k.to(dtype), padded_state_size)  # (B, T, H, K')
    v = pad_last(v.to(dtype), padded_head_size)  # (B, T, H, V')
    log_key_gate = pad_last(full_width(log_key_gate, state_size), padded_state_size)  # (B, T, H, K') float32
    log_value_gate = pad_last(full_width(log_value_gate, head_size), padded_head_size)  # (B, T, H, V') f32
    return q, k, v, log_key_gate, log_value_gate


def _pad_state(state: Tensor, state_size: int, head_size: int) -> Tensor:
    """[B, H, K0, V0] -> [B, H, state_size, head_size] float32, zero-padded (the same tensor when nothing
    changes)."""
    return pad_last(pad_last(state.float(), head_size), state_size, dim=-2)


def decay_fast_weights_cuda(q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state):
    """The CUDA path of `decay_fast_weights` (same arguments and returns; inputs as backend.py resolved
    them for it); raises KernelUnavailable if the extension cannot be built."""
    load_extension()
    state_size, head_size = q.shape[-1], v.shape[-1]
    q, k, v, log_key_gate, log_value_gate = _padded(q, k, v, log_key_gate, log_value_gate)
    if initial_state is not None:
        initial_state = _pad_state(initial_state, q.shape[-1], v.shape[-1])  # (B, H, K', V')
    o, final_state = ScanDecayFastWeights.apply(
        cuda_scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
    )
    o = o[..., :head_size]  # (B, T, H, V)
    if final_state is not None:
        final_state = final_state[..., :state_size, :head_size]  # (B, H, K, V)
    return o, final_state


def decay_fast_weights_step_cuda(q, k, v, log_key_gate, log_value_gate, state):
    """One decode step on the GPU; q, k [B, 1, H, state_size], v [B, 1, H, head_size]; updates the
    float32 `state` in place (backend.py sends other states to PyTorch).

    Sizes that are not multiples of 8 (V = D + 1 of the denominator presets) run on a zero-padded copy
    of the state, copied back after the step: two small copies, still one launch of the kernel and no
    host synchronisation (CUDA-graph safe).
    """
    load_extension()
    state_size, head_size = q.shape[-1], v.shape[-1]
    out_dtype = v.dtype
    q, k, v, log_key_gate, log_value_gate = _padded(q, k, v, log_key_gate, log_value_gate)
    padded = (q.shape[-1], v.shape[-1])
    if padded == (state_size, head_size):
        return step_op(q, k, v, log_key_gate, log_value_gate, state).to(out_dtype)
    padded_state = _pad_state(state, *padded)  # (B, H, K', V'), a copy
    o = step_op(q, k, v, log_key_gate, log_value_gate, padded_state)  # (B, 1, H, V')
    state.copy_(padded_state[..., :state_size, :head_size])
    return o[..., :head_size].to(out_dtype)
