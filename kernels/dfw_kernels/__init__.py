"""dfw_kernels: the fast-weight recurrence of decaying fast weights, as one functional API.

`decay_fast_weights` is the one place where the implementation is chosen: the CUDA kernel for CUDA
tensors when it can be built (`kernel="auto"` or `"cuda"`), else the pure-PyTorch chunkwise
reference in `reference.py`, which the tests trust.
"""

from __future__ import annotations

from torch import Tensor

from .reference import chunk_decay_fast_weights, recurrent_decay_fast_weights

KERNELS = ("auto", "cuda", "torch")

__all__ = [
    "KERNELS",
    "chunk_decay_fast_weights",
    "decay_fast_weights",
    "recurrent_decay_fast_weights",
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
        chunk_size: tokens per chunk of the PyTorch chunkwise form.
        kernel: "auto" (CUDA kernel for CUDA tensors when available, else PyTorch), "cuda", "torch".
    Returns:
        (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] in float32, or None).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "cuda":
        raise RuntimeError("kernel='cuda': the CUDA kernel is not built into this version; use kernel='auto'")
    return chunk_decay_fast_weights(
        q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state, chunk_size=chunk_size
    )
