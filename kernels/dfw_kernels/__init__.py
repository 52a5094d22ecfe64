"""dfw_kernels: the fast-weight recurrence of decaying fast weights, as one functional API.

`decay_fast_weights` (training, prefill) and `decay_fast_weights_step` (one decode token) run the
implementation that backend.py resolves, once per (kernel option, device, dtype, sizes): the CUDA
kernel (cuda.py, csrc/) for CUDA tensors when it can run (`kernel="auto"` or `"cuda"`), else the
PyTorch chunked scan of chunked.py (the same closed-form backward as the kernel), which the tests check
against the loop of reference.py. `kernel="auto"` says once in the log why it fell back; an explicit
kernel that cannot run raises `KernelUnavailable` with the reason. `kernel="triton"` is the chunked
tensor-core kernel of triton_chunk.py, opt-in only: it has passed its tests in Triton's interpreter on
CPU but not yet on a GPU, so "auto" never picks it (for decoding, "triton" uses the same step as "auto").
`unavailable_reason(kernel, device)` says, without building anything, whether a kernel can run here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cuda
from ._common import KernelUnavailable, input_dtype
from .backend import KERNELS, resolve, unavailable_reason
from .chunked import chunked_decay_fast_weights
from .reference import chunk_decay_fast_weights, recurrent_decay_fast_weights

__all__ = [
    "KERNELS",
    "KernelUnavailable",
    "chunk_decay_fast_weights",
    "chunked_decay_fast_weights",
    "decay_fast_weights",
    "decay_fast_weights_step",
    "recurrent_decay_fast_weights",
    "unavailable_reason",
]


def decay_fast_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None = None,
    log_value_gate: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    *,
    chunk_size: int = 64,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """S_t = diag(exp(log_key_gate_t)) S_{t-1} diag(exp(log_value_gate_t)) + k_t^T v_t;  o_t = q_t S_t.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        log_key_gate: [B, T, H, K] (or [B, T, H, 1]) log of the key-side gate, <= 0; None for no decay.
        log_value_gate: [B, T, H, V] (or [B, T, H, 1]) log of the value-side gate, <= 0; None for none.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.
        chunk_size: the largest chunk of the PyTorch path, which halves it while gates are small (the CUDA
            kernel picks its own).
        kernel: "auto" (CUDA kernel for CUDA tensors when available, else PyTorch), "cuda", "torch",
            "triton" (the chunked Triton kernel; CPU tensors only under TRITON_INTERPRET=1).
    Returns:
        (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] in float32, or None).
    Raises:
        KernelUnavailable: kernel="cuda" or "triton" cannot run here or on these inputs (the message says
            why).

    Here K is the state size (the key features) and V the value (head) size. The kernels take float32,
    bfloat16 and float16 inputs with K, V <= 128 (the CUDA kernel zero-pads sizes that are not multiples
    of 8), keep the state in float32 on chip, and differentiate every input, the log-gates and the
    initial state included (closed_form.py).
    """
    implementation = resolve(kernel, q.device, input_dtype(q, k, v), q.shape[-1], v.shape[-1])
    if implementation == "cuda":
        return cuda.decay_fast_weights_cuda(
            q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
        )
    if implementation == "triton":  # imported here: importing dfw_kernels never imports Triton
        from .triton_chunk import decay_fast_weights_triton

        return decay_fast_weights_triton(
            q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
        )
    return chunked_decay_fast_weights(
        q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state, chunk_size=chunk_size
    )


def decay_fast_weights_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None,
    log_value_gate: Tensor | None,
    state: Tensor,
    *,
    kernel: str = "auto",
) -> Tensor:
    """One decode token: state <- diag(exp(log_key_gate)) state diag(exp(log_value_gate)) + k^T v, in place;
    returns o = q state.

    Args:
        q, k: [B, H, K] or [B, 1, H, K]; v: [B, H, V] or [B, 1, H, V].
        log_key_gate, log_value_gate: like k and v (or with a last dimension of 1), or None.
        state: [B, H, K, V], updated in place (float32 for the CUDA kernel).
        kernel: as for `decay_fast_weights` ("triton" decodes as "auto").
    Returns:
        o, shaped like v, in v's dtype.
    Raises:
        KernelUnavailable: kernel="cuda" cannot run here, on these inputs or on a state that is not float32.
    """
    squeeze = q.dim() == 3
    if squeeze:  # [B, H, D] -> [B, 1, H, D]
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        log_key_gate = None if log_key_gate is None else log_key_gate.unsqueeze(1)
        log_value_gate = None if log_value_gate is None else log_value_gate.unsqueeze(1)
    implementation = resolve(
        kernel, q.device, input_dtype(q, k, v), q.shape[-1], v.shape[-1], decode=True, state_dtype=state.dtype
    )  # "triton" decodes as "auto" does: the chunked kernel has no decode step
    if implementation == "cuda":
        o = cuda.decay_fast_weights_step_cuda(q, k, v, log_key_gate, log_value_gate, state)
    else:
        o = _torch_step(q, k, v, log_key_gate, log_value_gate, state)
    return o.squeeze(1) if squeeze else o


@torch.no_grad()
def _torch_step(q, k, v, log_key_gate, log_value_gate, state):
    """The decode step in PyTorch: [B, 1, H, *] inputs, state [B, H, K, V] updated in place.

    Written in few operator calls (one in-place batched outer-product add, one batched read): at decode
    sizes each call's overhead, not the arithmetic, is what a token costs on a CPU.
    """
    B, _, H, K = k.shape
    V, dtype = v.shape[-1], state.dtype
    cast = lambda t: t if t.dtype == dtype else t.to(dtype)
    if log_key_gate is not None:
        state.mul_(cast(log_key_gate).exp().reshape(B, H, -1, 1))  # (B, H, K|1, 1)
    if log_value_gate is not None:
        state.mul_(cast(log_value_gate).exp().reshape(B, H, 1, -1))  # (B, H, 1, V|1)
    rows = state.view(B * H, K, V) if state.is_contiguous() else None  # (B*H, K, V), the same memory
    if rows is not None:
        rows.baddbmm_(cast(k).reshape(B * H, K, 1), cast(v).reshape(B * H, 1, V))  # += k^T v
    else:
        state.add_(cast(k).reshape(B, H, K, 1) * cast(v).reshape(B, H, 1, V))  # (B, H, K, V)
    o = torch.matmul(cast(q).reshape(B, H, 1, K), state)  # (B, H, 1, V)
    return o.view(B, 1, H, V).to(v.dtype)  # (B, 1, H, V)
