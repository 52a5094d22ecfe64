"""What the kernel paths share (private): the one "cannot run here" exception, the limits and dtypes
they take, the input checks, poisoned outputs for the tests, and the gate and padding helpers.

cuda.py, triton_chunk.py and backend.py import from here; none of them imports another's private helper.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

# The largest key size (attention.state_size, K inside the kernels) and value size (the head size, V)
# the CUDA and Triton kernels take: the CUDA kernel keeps a K x V float32 state in registers
# (dfw::kMaxStateDim in csrc/dfw_scan.h).
MAX_STATE_DIM = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # input dtypes the kernels take

# Tests switch this on (dfw_kernels.testing.poisoned_outputs): every output a kernel writes is
# NaN-filled before it runs, so an element it forgets cannot pass.
POISON_OUTPUTS = False


class KernelUnavailable(RuntimeError):
    """A kernel asked for cannot run here (no GPU, no compiler, no Triton, inputs it does not take);
    the message says why and what to do instead."""


def input_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """The one dtype q, k and v are computed in (their promotion)."""
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def unsupported_inputs_reason(dtype: torch.dtype, state_size: int, head_size: int) -> str | None:
    """Why the kernels do not take inputs of this dtype and sizes, or None (both kernels: same limits)."""
    if dtype not in DTYPES:
        return f"the kernel takes float32, bfloat16 or float16 inputs, got {dtype}"
    if max(state_size, head_size) > MAX_STATE_DIM:
        return (
            f"the kernel takes key (state_size) and value (head) sizes up to {MAX_STATE_DIM}, "
            f"got {state_size} and {head_size}"
        )
    return None


def new_output(shape, dtype: torch.dtype, like: Tensor) -> Tensor:
    """An uninitialised output on `like`'s device (NaN-filled while POISON_OUTPUTS is on)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@overload
def full_width(log_gate: Tensor, width: int) -> Tensor: ...
@overload
def full_width(log_gate: None, width: int) -> None: ...
def full_width(log_gate: Tensor | None, width: int) -> Tensor | None:
    """[B, T, H, 1] (one gate per head) or [B, T, H, width] -> [B, T, H, width] float32: a broadcast view,
    no copy (autograd sums its gradient back)."""
    if log_gate is None:
        return None
    return log_gate.float().expand(*log_gate.shape[:-1], width)


@overload
def pad_last(x: Tensor, size: int, dim: int = -1) -> Tensor: ...
@overload
def pad_last(x: None, size: int, dim: int = -1) -> None: ...
def pad_last(x: Tensor | None, size: int, dim: int = -1) -> Tensor | None:
    """x zero-padded along `dim` (a negative index) to `size`; x itself when it already has that size."""
    if x is None or x.shape[dim] == size:
        return x
    pad = [0, 0] * (-dim - 1) + [0, size - x.shape[dim]]
    return F.pad(x, pad)
