"""Decaying fast weights in plain PyTorch: the reference the tests trust, and the CPU path.

Notation and layout follow fla (and docs/math.md): per head, key size K (= the state size m
after the feature map) and value size V (= the head size d); the state S is K x V.

    S_t = diag(alpha_t) S_{t-1} diag(beta_t) + k_t^T v_t        o_t = q_t S_t   (read after write)

The paper writes the state as d x m (value x key): the transpose of this one, and the same model.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log_key_gate = log alpha [B, T, H, K] and
log_value_gate = log beta [B, T, H, V], each also accepted with a last dimension of 1 (one scalar
gate per head, as in RFA) or as None (no decay on that side); initial_state and the returned state
[B, H, K, V]. Outputs come back in v's dtype; states are kept in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs, float64 for float64: the dtype states are kept in."""
    return torch.promote_types(dtype, torch.float32)


def log_gate_floor(dtype: torch.dtype) -> float:
    """The finite floor the chunked forms clamp log-gates to: exp of it, and of any sum with it, is 0 in
    `dtype`.

    A log-gate of -inf (a gate of exactly 0) would otherwise make a running sum subtract -inf from -inf
    (NaN) where the loop is finite. -128 in float32 (exp underflows below -104), -1024 in float64 (-745).
    Clamping changes no result: exp(floor) is already 0, and so is the gradient through the gate there.
    """
    return -1024.0 if dtype == torch.float64 else -128.0


def recurrent_decay_fast_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None = None,
    log_value_gate: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The recurrence as written: a loop over time. Use for decoding and as the test oracle."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = accumulation_dtype(q.dtype)
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=dtype)
    else:
        S = initial_state.to(dtype)
    outputs = []
    for t in range(T):
        if log_key_gate is not None:
            S = S * log_key_gate[:, t].to(dtype).exp().unsqueeze(-1)  # (B, H, K, 1)
        if log_value_gate is not None:
            S = S * log_value_gate[:, t].to(dtype).exp().unsqueeze(-2)  # (B, H, 1, V)
        S = S + k[:, t].to(dtype).unsqueeze(-1) * v[:, t].to(dtype).unsqueeze(-2)  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(dtype), S))  # (B, H, V)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V, dtype=dtype)  # (B, T, H, V)
    return o.to(v.dtype), (S if output_final_state else None)


def _to_chunks(x: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padded at the end of time to a multiple of C."""
    B, T, H, D = x.shape
    x = x.transpose(1, 2).to(dtype)  # (B, H, T, D)
    pad = (-T) % chunk_size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(B, H, -1, chunk_size, D)  # (B, H, N, C, D)


def _cumulative_log_decay(log_gate: Tensor | None, chunk_size: int, dtype) -> Tensor | None:
    """Log-gates -> decay accumulated from each chunk's start, [B, H, N, C, D or 1] (every entry <= 0).

    Padded positions get log-gate 0 (gate 1), so they leave the state as it was; log-gates below
    `log_gate_floor` (-inf included) are raised to it, which changes no result. A scalar gate per
    head (last dim 1) stays scalar: it broadcasts, and its pairwise decays are c x c, not c x c x D.
    """
    if log_gate is None:
        return None
    return _to_chunks(log_gate, chunk_size, dtype).clamp_min(log_gate_floor(dtype)).cumsum(dim=-2)


def _no_tokens(q: Tensor, v: Tensor, initial_state: Tensor | None, output_final_state: bool):
    """The result for T = 0: o [B, 0, H, V] (still attached to v's graph) and the initial state."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    o = v[:, :0] * 1  # (B, 0, H, V), a new tensor
    if not output_final_state:
        return o, None
    dtype = accumulation_dtype(q.dtype)
    if initial_state is None:
        return o, q.new_zeros(B, H, K, V, dtype=dtype)
    return o, initial_state.to(dtype) * 1  # (B, H, K, V), a new tensor that carries the gradient


def chunk_decay_fast_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None = None,
    log_value_gate: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    subchunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """The stable chunkwise form: parallel inside a chunk, a loop over chunks only.

    Every exponent it takes is <= 0, so it stays finite in float32 for gates down to ~1e-3 per step:
    within a chunk, decays between sub-chunks factor through the last token before the query's
    sub-chunk; inside a sub-chunk they are taken pairwise.
    """
    if chunk_size <= 0 or subchunk_size <= 0 or chunk_size % subchunk_size:
        raise ValueError(
            f"chunk_size must be a positive multiple of subchunk_size, got {chunk_size} and {subchunk_size}"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:  # no tokens: an empty output, and the initial state (or zeros) as the final state
        return _no_tokens(q, v, initial_state, output_final_state)
    C, c = chunk_size, subchunk_size
    dtype = accumulation_dtype(q.dtype)
    qc, kc, vc = (_to_chunks(x, C, dtype) for x in (q, k, v))  # (B, H, N, C, K|V)
    a = _cumulative_log_decay(log_key_gate, C, dtype)  # (B, H, N, C, K or 1) or None
    d = _cumulative_log_decay(log_value_gate, C, dtype)  # (B, H, N, C, V or 1) or None
    N = qc.shape[2]
    n_sub = C // c

    # Intra-chunk, diagonal sub-chunks: exponents taken pairwise, masked to s <= t before exp.
    sub = lambda x: x.reshape(*x.shape[:3], n_sub, c, x.shape[-1])  # (B, H, N, S, c, D)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # (t, s)
    q_s, k_s, v_s = sub(qc), sub(kc), sub(vc)
    if a is None:
        scores = (q_s @ k_s.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, S, c, c)
    else:
        a_s = sub(a)
        key_decay = (a_s.unsqueeze(-2) - a_s.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
        if a.shape[-1] == 1:  # one gate per head: the decay factors out of the sum over k
            scores = (q_s @ k_s.transpose(-1, -2)) * key_decay.squeeze(-1).exp()  # (B, H, N, S, c, c)
        else:
            scores = torch.einsum("...tk,...sk,...tsk->...ts", q_s, k_s, key_decay.exp())
    if d is None:
        o_diag = scores @ v_s  # (B, H, N, S, c, V)
    else:
        d_s = sub(d)
        value_decay = (d_s.unsqueeze(-2) - d_s.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
        if d.shape[-1] == 1:
            o_diag = (scores * value_decay.squeeze(-1).exp()) @ v_s
        else:
            o_diag = torch.einsum("...ts,...sv,...tsv->...tv", scores, v_s, value_decay.exp())
    pieces = [o_diag[:, :, :, 0]]  # (B, H, N, c, V) each

    # Intra-chunk, earlier sub-chunks: factor every decay through the boundary b = J*c - 1.
    for J in range(1, n_sub):
        now, before, b = slice(J * c, (J + 1) * c), slice(0, J * c), slice(J * c - 1, J * c)
        q_J, k_before, v_before = qc[..., now, :], kc[..., before, :], vc[..., before, :]
        if a is not None:
            q_J = q_J * (a[..., now, :] - a[..., b, :]).exp()  # (B, H, N, c, K)
            k_before = k_before * (a[..., b, :] - a[..., before, :]).exp()  # (B, H, N, J*c, K)
        if d is not None:
            v_before = v_before * (d[..., b, :] - d[..., before, :]).exp()  # (B, H, N, J*c, V)
        o_J = (q_J @ k_before.transpose(-1, -2)) @ v_before  # (B, H, N, c, V)
        if d is not None:
            o_J = o_J * (d[..., now, :] - d[..., b, :]).exp()
        pieces.append(o_diag[:, :, :, J] + o_J)
    o = torch.cat(pieces, dim=-2)  # (B, H, N, C, V)

    # Inter-chunk: carry the state from chunk to chunk, then read it from every query at once.
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    chunk_start_states = []
    for n in range(N):
        chunk_start_states.append(S)
        k_n, v_n = kc[:, :, n], vc[:, :, n]  # (B, H, C, K|V)
        if a is not None:
            a_end = a[:, :, n, -1:]  # (B, H, 1, K)
            k_n = k_n * (a_end - a[:, :, n]).exp()
            S = S * a_end.transpose(-1, -2).exp()  # (B, H, K, 1) broadcast
        if d is not None:
            d_end = d[:, :, n, -1:]  # (B, H, 1, V)
            v_n = v_n * (d_end - d[:, :, n]).exp()
            S = S * d_end.exp()
        S = S + k_n.transpose(-1, -2) @ v_n  # (B, H, K, V)
    states = torch.stack(chunk_start_states, dim=2)  # (B, H, N, K, V)
    q_read = qc if a is None else qc * a.exp()
    o_inter = q_read @ states  # (B, H, N, C, V)
    if d is not None:
        o_inter = o_inter * d.exp()
    o = (o + o_inter).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(v.dtype), (S if output_final_state else None)
