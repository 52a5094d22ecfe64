"""dfw_kernels: the fast-weight recurrence of decaying fast weights, as one functional API.

`decay_fast_weights` (training, prefill) and `decay_fast_weights_step` (one decode token) are the one
place where the implementation is chosen: the CUDA kernel (cuda.py, csrc/) for CUDA tensors when it
can run (`kernel="auto"` or `"cuda"`), else the pure-PyTorch chunkwise form of reference.py, which the
tests trust. `kernel="auto"` says once in the log why it fell back; `kernel="cuda"` raises instead.
A chunked tensor-core kernel would be one more entry of KERNELS, chosen here the same way.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import cuda
from .reference import chunk_decay_fast_weights, recurrent_decay_fast_weights

KERNELS = ("auto", "cuda", "torch")

__all__ = [
    "KERNELS",
    "chunk_decay_fast_weights",
    "decay_fast_weights",
    "decay_fast_weights_step",
    "recurrent_decay_fast_weights",
]

logger = logging.getLogger("dfw_kernels")
_logged_fallbacks: set[tuple[str, str]] = set()


def _use_cuda(kernel: str, q: Tensor, k: Tensor, v: Tensor, what: str) -> bool:
    """Whether to take the CUDA path; logs the reason for a fallback once, or raises for kernel="cuda"."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return False
    reason = cuda.unsupported_reason(q, k, v)
    if reason is None:
        try:
            cuda.load_extension()
            return True
        except cuda.KernelUnavailable as error:
            reason = str(error)
    if kernel == "cuda":
        raise cuda.KernelUnavailable(f"kernel='cuda' cannot run: {reason}. Use kernel='auto' or 'torch'.")
    _log_fallback(what, reason, q.device)
    return False


def _log_fallback(what: str, reason: str, device: torch.device) -> None:
    """Say once per process and reason (not once per token of every layer) that PyTorch runs instead."""
    if (what, reason) in _logged_fallbacks:
        return
    _logged_fallbacks.add((what, reason))
    log = logger.info if device.type != "cuda" else logger.warning
    log("dfw_kernels: %s uses the PyTorch reference: %s", what, reason)


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
        chunk_size: tokens per chunk of the PyTorch chunkwise form (the CUDA kernel picks its own).
        kernel: "auto" (CUDA kernel for CUDA tensors when available, else PyTorch), "cuda", "torch".
    Returns:
        (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] in float32, or None).

    The CUDA kernel takes float32, bfloat16 and float16 inputs with K, V <= 128 (sizes that are not
    multiples of 8 are zero-padded), keeps the state in float32 on chip, and differentiates every
    input, the log-gates and the initial state included (closed_form.py).
    """
    if _use_cuda(kernel, q, k, v, "decay_fast_weights"):
        return cuda.decay_fast_weights_cuda(
            q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
        )
    return chunk_decay_fast_weights(
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
        kernel: as for `decay_fast_weights`.
    Returns:
        o, shaped like v, in v's dtype.
    """
    squeeze = q.dim() == 3
    if squeeze:  # [B, H, D] -> [B, 1, H, D]
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        log_key_gate = None if log_key_gate is None else log_key_gate.unsqueeze(1)
        log_value_gate = None if log_value_gate is None else log_value_gate.unsqueeze(1)
    o = None
    if _use_cuda(kernel, q, k, v, "decay_fast_weights_step"):
        try:
            o = cuda.decay_fast_weights_step_cuda(q, k, v, log_key_gate, log_value_gate, state)
        except cuda.KernelUnavailable as error:
            if kernel == "cuda":
                raise
            _log_fallback("decay_fast_weights_step", str(error), q.device)
    if o is None:
        o = _torch_step(q, k, v, log_key_gate, log_value_gate, state)
    return o.squeeze(1) if squeeze else o


@torch.no_grad()
def _torch_step(q, k, v, log_key_gate, log_value_gate, state):
    """The decode step in PyTorch: [B, 1, H, *] inputs, state [B, H, K, V] updated in place."""
    dtype = state.dtype
    if log_key_gate is not None:
        state.mul_(log_key_gate[:, 0].to(dtype).exp().unsqueeze(-1))  # (B, H, K, 1)
    if log_value_gate is not None:
        state.mul_(log_value_gate[:, 0].to(dtype).exp().unsqueeze(-2))  # (B, H, 1, V)
    state.add_(k[:, 0].to(dtype).unsqueeze(-1) * v[:, 0].to(dtype).unsqueeze(-2))  # (B, H, K, V)
    return torch.einsum("bhk,bhkv->bhv", q[:, 0].to(dtype), state).unsqueeze(1).to(v.dtype)  # (B, 1, H, V)
