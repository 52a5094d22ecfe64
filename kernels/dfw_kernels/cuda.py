"""The CUDA scan: built on first use, exposed as torch.library custom ops, differentiated in closed form.

Building. `load_extension()` compiles csrc/binding.cpp and csrc/dfw_scan.cu with
torch.utils.cpp_extension (ninja, cached: later processes load the cached build in about a second).
Ahead of time: `python -m dfw_kernels` builds it now; with DFW_KERNELS_BUILD_DIR set, the build
goes to (and is later loaded from) that folder, e.g. one baked into a container image. Importing this
module never builds or touches the GPU; `unavailable_reason()` says why the kernel cannot run here.

Ops. `torch.ops.dfw_kernels.scan` (functional) and `torch.ops.dfw_kernels.step` (updates a state in
place), with fake implementations for torch.compile. The autograd is `ScanDecayFastWeights` from
closed_form.py, run with `cuda_scan`: one scan forward, three scans backward.
"""

import logging
import os
from pathlib import Path
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

from .closed_form import ScanDecayFastWeights, ScanResult

logger = logging.getLogger("dfw_kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "binding.cpp", CSRC / "dfw_scan.cu")
BUILD_DIR_ENV = "DFW_KERNELS_BUILD_DIR"
MAX_HEAD_DIM = 128  # dfw::kMaxHeadDim
HEAD_DIM_MULTIPLE = 8  # dfw::kHeadDimMultiple: other sizes are zero-padded here
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this: every output is NaN-filled before the kernel runs, so an unwritten one cannot pass.
POISON_OUTPUTS = False

_extension = None
_build_error: str | None = None
_build_attempts = 0
MAX_BUILD_ATTEMPTS = 2  # a failed build is tried once more (a lock left by a killed build, a full /tmp)


class KernelUnavailable(RuntimeError):
    """The CUDA kernel cannot run here; the message says why and what to do."""


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
    if major < 8:
        return f"the kernel needs compute capability 8.0 or newer (cp.async), this GPU has {major}.{minor}"
    if _build_error is not None and _build_attempts >= MAX_BUILD_ATTEMPTS:
        return _build_error
    return None


def clear_build_error() -> None:
    """Forget a failed build, so that the next call of load_extension() tries again."""
    global _build_error, _build_attempts
    _build_error, _build_attempts = None, 0


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


def _output(shape, dtype, like: Tensor) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


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
    [B, H, K, V] float32 (any strides). K and V multiples of 8 up to 128. The gate-gradient epilogue runs when gate_grad_x1 and gate_grad_x2 are given.
    """
    q, k, v = (_aligned(x) for x in (q, k, v))
    log_key_gate, log_value_gate, gate_grad_x1, gate_grad_x2, gate_grad_start = (
        _aligned(x) for x in (log_key_gate, log_value_gate, gate_grad_x1, gate_grad_x2, gate_grad_start)
    )
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = torch.float32
    out = _output((B, T, H, V), q.dtype, q) if output else None
    out_pre = _output((B, T, H, V), f32, q) if output_pre else None
    final = _output((B, H, K, V), f32, q) if output_final_state else None
    final_pre = _output((B, H, K, V), f32, q) if output_final_pre_state else None
    with_gate_grad = gate_grad_x1 is not None and gate_grad_x2 is not None
    gate_grad = _output((B, T, H, V), f32, q) if with_gate_grad else None
    with torch.cuda.device(q.device):
        load_extension().scan(
            q, k, v, log_key_gate, log_value_gate, initial_state, final, final_pre, out, out_pre,
            gate_grad, gate_grad_x1, gate_grad_x2, gate_grad_start, reverse,
            torch.cuda.current_stream(q.device).cuda_stream,
        )  # fmt: skip
    # The ops return a fixed number of tensors: an empty one stands for "not asked for".

    def or_empty(x: Tensor | None) -> Tensor:
        return x if x is not None else q.new_empty(0)

    return or_empty(out), or_empty(out_pre), or_empty(final), or_empty(final_pre), or_empty(gate_grad)


@scan_op.register_fake
def _(q, k, v, log_key_gate, log_value_gate, initial_state, gate_grad_x1, gate_grad_x2, gate_grad_start,
      reverse, output, output_pre, output_final_state, output_final_pre_state):  # fmt: skip
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
    out = _output(v.shape, q.dtype, q)
    with torch.cuda.device(q.device):
        load_extension().scan(
            q, k, v, log_key_gate, log_value_gate, state, state, None, out, None, None, None, None, None,
            False, torch.cuda.current_stream(q.device).cuda_stream,
        )  # fmt: skip
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
    q, k, v, log_key_gate, log_value_gate, initial_state, *, reverse=False, out_dtype=None, output_pre=False,
    output_final_state=False, output_final_pre_state=False, gate_grad_inputs=None,
) -> ScanResult:  # fmt: skip
    """closed_form.Scan on the GPU: the custom op, with its empty "not asked for" outputs as None."""
    x1 = x2 = start = None
    if gate_grad_inputs is not None:
        x1, x2, start = gate_grad_inputs
        x1, x2 = x1.float(), x2.to(q.dtype)
        start = None if start is None else start.float()
    out, out_pre, final, final_pre, gate_grad = scan_op(
        q, k.to(q.dtype), v.to(q.dtype), log_key_gate, log_value_gate, initial_state, x1, x2, start, reverse,
        out_dtype is not None, output_pre, output_final_state, output_final_pre_state,
    )  # fmt: skip
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return ScanResult(
        out=out if out_dtype is not None else None,
        out_pre=out_pre if output_pre else None,
        final_state=final if output_final_state else None,
        final_pre_state=final_pre if output_final_pre_state else None,
        gate_grad=gate_grad if gate_grad_inputs is not None else None,
    )


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why these inputs cannot take the CUDA path (device, dtype, head size), or None."""
    if q.device.type != "cuda":
        return f"the inputs are on {q.device.type}, not CUDA"
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in DTYPES:
        return f"the kernel takes float32, bfloat16 or float16, got {dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return (
            f"the kernel takes key and value sizes up to {MAX_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}"
        )
    return unavailable_reason(q.device)


def _full_width(log_gate: Tensor | None, width: int) -> Tensor | None:
    """[B, T, H, 1] (one gate per head) or [B, T, H, width] -> [B, T, H, width] float32 (autograd sums back)."""
    if log_gate is None:
        return None
    return log_gate.float().expand(*log_gate.shape[:-1], width)


@overload
def _pad_last(x: Tensor, size: int, dim: int = -1) -> Tensor: ...
@overload
def _pad_last(x: None, size: int, dim: int = -1) -> None: ...
def _pad_last(x: Tensor | None, size: int, dim: int = -1) -> Tensor | None:
    if x is None or x.shape[dim] == size:
        return x
    pad = [0, 0] * (-dim - 1) + [0, size - x.shape[dim]]
    return F.pad(x, pad)


def _padded(q, k, v, log_key_gate, log_value_gate):
    """Inputs zero-padded to head sizes that are multiples of 8, in one dtype; gates [B, T, H, K|V] float32.

    Zero padding is exact: padded keys and queries are 0, padded gates are 1, padded values are 0.
    """
    K, V = q.shape[-1], v.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    Kp, Vp = (-(-D // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE for D in (K, V))  # zero-padded sizes
    q, k = _pad_last(q.to(dtype), Kp), _pad_last(k.to(dtype), Kp)  # (B, T, H, Kp)
    v = _pad_last(v.to(dtype), Vp)  # (B, T, H, Vp)
    log_key_gate = _pad_last(_full_width(log_key_gate, K), Kp)  # (B, T, H, Kp) float32
    log_value_gate = _pad_last(_full_width(log_value_gate, V), Vp)  # (B, T, H, Vp) float32
    return q, k, v, log_key_gate, log_value_gate


def _pad_state(state: Tensor, K: int, V: int) -> Tensor:
    """[B, H, K0, V0] -> [B, H, K, V] float32, zero-padded (the same tensor when nothing changes)."""
    return _pad_last(_pad_last(state.float(), V), K, dim=-2)


def decay_fast_weights_cuda(q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state):
    """The CUDA path of `decay_fast_weights` (same arguments and returns); raises KernelUnavailable."""
    load_extension()
    K, V = q.shape[-1], v.shape[-1]
    q, k, v, log_key_gate, log_value_gate = _padded(q, k, v, log_key_gate, log_value_gate)
    if initial_state is not None:
        initial_state = _pad_state(initial_state, q.shape[-1], v.shape[-1])  # (B, H, Kp, Vp)
    o, final_state = ScanDecayFastWeights.apply(
        cuda_scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
    )
    o = o[..., :V]  # (B, T, H, V)
    if final_state is not None:
        final_state = final_state[..., :K, :V]  # (B, H, K, V)
    return o, final_state


def decay_fast_weights_step_cuda(q, k, v, log_key_gate, log_value_gate, state):
    """One decode step on the GPU; q, k [B, 1, H, K], v [B, 1, H, V]; updates `state` in place.

    Head sizes that are not multiples of 8 (V = D + 1 of the denominator presets) run on a
    zero-padded copy of the state, copied back after the step: two small copies, still one launch
    of the kernel and no host synchronisation (CUDA-graph safe).
    """
    load_extension()
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise KernelUnavailable(
            f"the decode step takes key and value sizes up to {MAX_HEAD_DIM}, got {K} and {V}"
        )
    if state.dtype != torch.float32:
        raise KernelUnavailable(f"the decode step updates a float32 state in place, got {state.dtype}")
    out_dtype = v.dtype
    q, k, v, log_key_gate, log_value_gate = _padded(q, k, v, log_key_gate, log_value_gate)
    Kp, Vp = q.shape[-1], v.shape[-1]
    if (Kp, Vp) == (K, V):
        return step_op(q, k, v, log_key_gate, log_value_gate, state).to(out_dtype)
    padded_state = _pad_state(state, Kp, Vp)  # (B, H, Kp, Vp), a copy
    o = step_op(q, k, v, log_key_gate, log_value_gate, padded_state)  # (B, 1, H, Vp)
    state.copy_(padded_state[..., :K, :V])
    return o[..., :V].to(out_dtype)
