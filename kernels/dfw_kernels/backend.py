"""Which implementation runs a call, decided in one place: once per (kernel option, device, dtype, sizes).

    kernel="torch"   the PyTorch chunked scan (chunked.py), anywhere
    kernel="cuda"    the CUDA kernel (cuda.py, csrc/), or KernelUnavailable saying why it cannot run
    kernel="triton"  the chunked Triton kernels (triton_chunk.py), or KernelUnavailable; its decode
                     step is auto's (the chunked form has no step of its own)
    kernel="auto"    the CUDA kernel where it can run, else PyTorch, saying why once in the log

`unavailable_reason(kernel, device)` answers whether a kernel can run on a device at all (no GPU, no
compiler, no Triton, no interpreter), cheaply and without building anything: a model checks it when it is
built (dfw/attention/fast_weight.py), so a wrong `attention.kernel` fails there with one line.
`resolve` adds what the inputs decide (dtype, sizes, the decode state's dtype) and the CUDA build, and
remembers its answer; every later call with the same key is a dictionary lookup.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import torch

from . import cuda
from ._common import KernelUnavailable, unsupported_inputs_reason

KERNELS = ("auto", "cuda", "torch", "triton")
logger = logging.getLogger("dfw_kernels")

_resolved: dict[tuple, tuple[str | None, str | None]] = {}  # key -> (implementation, or None and why)
_logged_fallbacks: set[tuple[str, str]] = set()


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _default_device(device) -> torch.device:
    """The device a model here runs on unless told: the current CUDA device when torch sees one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def triton_interpreting() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton's import)."""
    module = sys.modules.get("dfw_kernels.triton_chunk")
    if module is not None and module.triton is not None:
        return module.interpreting()
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return (
            "Triton is not installed (pip install triton; Linux x86_64 wheels also run on CPU, interpreted)"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < cuda.MIN_CAPABILITY:
            return (
                "the Triton kernel needs compute capability 8.0 or newer (bfloat16 tl.dot), "
                f"this GPU has {major}.{minor}"
            )
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return (
        f"the Triton kernel runs CUDA tensors, or CPU tensors in Triton's interpreter only (set "
        f"TRITON_INTERPRET=1 in the environment before Python starts; slow, for tests), not {device.type}"
    )


def _cuda_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        reason = cuda.unavailable_reason()  # why there is no usable GPU at all, if so
        return f"the CUDA kernel runs CUDA tensors, not {device.type}" + (f" ({reason})" if reason else "")
    return cuda.unavailable_reason(device)


def unavailable_reason(kernel: str, device: torch.device | str | None = None) -> str | None:
    """Why `kernel` cannot run on `device` here, or None if it can (cheap: builds and compiles nothing).

    kernel: one of KERNELS ("auto" and "torch" run anywhere). device: where the inputs will be; None for
    the device a model here runs on (the current CUDA device when torch sees one, else the CPU).
    A failed CUDA build is reported too, once it has happened (decay_fast_weights raises or falls back).
    """
    _check_kernel(kernel)
    if kernel in ("auto", "torch"):
        return None
    if kernel == "cuda" and device is None:
        return cuda.unavailable_reason()  # the current CUDA device, or why there is none
    device = _default_device(device)
    return _cuda_reason(device) if kernel == "cuda" else _triton_reason(device)


def resolve(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    state_size: int,
    head_size: int,
    *,
    decode: bool = False,
    state_dtype: torch.dtype | None = None,
) -> str:
    """The implementation that runs: "cuda", "triton" or "torch"; decided once per distinct arguments.

    kernel: as `decay_fast_weights` takes it; dtype: the inputs' (promoted) dtype; decode: the one-token
    step (state_dtype: its state's). Raises KernelUnavailable (saying why and what to use instead) when an
    explicitly asked-for kernel cannot run, ValueError for a kernel that does not exist.
    """
    implementation, reason = _answer(kernel, device, dtype, state_size, head_size, decode, state_dtype)
    if implementation is None:
        raise KernelUnavailable(reason)
    return implementation


# torch.compile calls this while it traces and keeps its result as a constant (its guards on the
# inputs' device and dtype decide again when they change): the decision's logging and the CUDA build
# stay out of the graph.
@torch.compiler.assume_constant_result
def _answer(
    kernel, device, dtype, state_size, head_size, decode, state_dtype
) -> tuple[str | None, str | None]:
    key = (kernel, device, dtype, state_size, head_size, decode, state_dtype, cuda.build_generation)
    answer = _resolved.get(key)
    if answer is None:
        _check_kernel(kernel)
        answer = _resolved[key] = _decide(kernel, device, dtype, state_size, head_size, decode, state_dtype)
    return answer


def _decide(
    kernel, device, dtype, state_size, head_size, decode, state_dtype
) -> tuple[str | None, str | None]:
    what = "decay_fast_weights_step" if decode else "decay_fast_weights"
    if kernel == "torch":
        return "torch", None
    if kernel == "triton" and not decode:
        reason = _triton_reason(device) or unsupported_inputs_reason(dtype, state_size, head_size)
        if reason is None:
            return "triton", None
        return None, f"kernel='triton' cannot run: {reason}. Use kernel='auto' or 'torch'."
    reason = _cuda_reason(device) or unsupported_inputs_reason(dtype, state_size, head_size)
    if reason is None and decode and state_dtype != torch.float32:
        reason = f"the decode step updates a float32 state in place, got {state_dtype}"
    if reason is None:
        try:
            cuda.load_extension()
            return "cuda", None
        except KernelUnavailable as error:
            reason = str(error)
    if kernel == "cuda":
        return None, f"kernel='cuda' cannot run: {reason}. Use kernel='auto' or 'torch'."
    _log_fallback(what, reason, device)
    return "torch", None


def _log_fallback(what: str, reason: str, device: torch.device) -> None:
    """Say once per process and reason (not once per token of every layer) that PyTorch runs instead."""
    if (what, reason) in _logged_fallbacks:
        return
    _logged_fallbacks.add((what, reason))
    log = logger.info if device.type != "cuda" else logger.warning
    log("dfw_kernels: %s uses the PyTorch reference: %s", what, reason)


def forget() -> None:
    """Forget every resolution and logged fallback (tests; after installing a compiler or Triton)."""
    _resolved.clear()
    _logged_fallbacks.clear()
