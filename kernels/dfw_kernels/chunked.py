"""The fast PyTorch path: chunks of matrix products forward, three chunked scans backward, nothing stored.

`chunked_decay_fast_weights` is closed_form.py's `ScanDecayFastWeights` (the forward as one scan, the
backward as three that recompute their states, with the cancellation-free gate gradients of the CUDA
kernel) run with `chunk_scan`, a chunked form of `closed_form.scan_reference` in plain PyTorch. Autograd
keeps only q, k, v, the log-gates, the initial state and one [B, T, H, V] read for the backward; the
plain differentiable chunkwise form of reference.py keeps every pairwise sub-chunk tensor instead.

`chunk_scan`, per chunk of c tokens, with a, d the log-decays accumulated in the scan's order from the
chunk's start (a_last, d_last: the whole chunk's):
  - within the chunk, e^{a_t - a_s} = e^{a_t - m} e^{m - a_s} with m = a_last / 2 (n = d_last / 2 on the
    value side), so the strictly causal read (s < t) is two batched matrix products of q e^{a - m},
    k e^{m - a} and v e^{n - d}, scaled by e^{d - n}. Every factor lies within e^{+-R/2}, R the chunk's
    decay: `chunk_size_for` halves c until no c tokens decay by more than `max_chunk_decay` (with tiny
    gates down to c = 1, a loop over tokens with no pairs within a chunk);
  - the state is carried from chunk to chunk, and read, with the exact decays, all <= 1 (a short loop
    over chunks): read q_t e^{a_t} S e^{d_t};
    S <- e^{a_last} S e^{d_last} + (k e^{a_last - a})^T (v e^{d_last - d});
  - out_t = out_pre_t + (q_t . k_t) v_t: the token's own term is added, never subtracted;
  - a reverse scan runs the same way with suffix sums, the chunks in reverse order and the gates shifted
    by one token (step t decays by token t + 1's gate), so nothing is flipped;
  - log-gates are clamped to `reference.log_gate_floor` (-inf gives the loop's result, not NaN).
Inputs go to a chunk-major [N, B*H, c, D] layout in one copy each, so every chunk's products are
contiguous batched matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .closed_form import ScanDecayFastWeights, ScanResult
from .reference import accumulation_dtype, log_gate_floor


def max_chunk_decay(dtype: torch.dtype) -> float:
    """How many nats a chunk may decay by (its largest key-side decay plus its largest value-side one) for
    the factored form: 120 in float32, 600 in float64.

    Every factor then lies within e^{+-60} (float32 overflows at e^88): products that exceed that are the
    anti-causal entries (s > t), which are masked by selection, never by multiplication. Larger chunks
    would also multiply more denormal numbers (true decays below e^-87), which x86 computes ~100x slower."""
    return 600.0 if dtype == torch.float64 else 120.0


def chunk_size_for(
    log_key_gate: Tensor | None, log_value_gate: Tensor | None, max_chunk_size: int, dtype: torch.dtype
) -> int:
    """The largest power of two c <= max_chunk_size for which any c consecutive tokens decay by at most
    `max_chunk_decay(dtype)` nats (largest key-side decay plus largest value-side decay; bounded here by
    the sum over tokens of each token's largest decay); at least 1.

    Any c consecutive tokens, not only the forward scan's chunks: the reverse scans of the backward
    (gates shifted by one token) cut time elsewhere, and use the same c."""
    limit = max_chunk_decay(dtype)
    c = 1 << (max_chunk_size.bit_length() - 1)
    bound: float | Tensor = (
        0.0  # per token: the largest |log-gate| over channels, both sides (B, T, H); bounds any channel's
    )
    for g in (log_key_gate, log_value_gate):
        if g is not None:
            bound = bound + g.detach().to(dtype).abs().amax(-1)
    if not isinstance(bound, Tensor):
        return c
    # Running sums (B, 1 + T, H); a token beyond the limit on its own fails every c > 1 (and stays finite).
    sums = F.pad(bound.clamp_max(2 * limit).cumsum(1), (0, 0, 1, 0))
    while c > 1 and sums.shape[1] > 1:
        window = min(c, sums.shape[1] - 1)
        if float((sums[:, window:] - sums[:, :-window]).max()) <= limit:
            break
        c //= 2
    return c


def _to_chunks(x: Tensor, c: int, N: int, dtype: torch.dtype, shift: bool = False) -> Tensor:
    """[B, T, H, D] -> [N, B*H, c, D] in `dtype`, in one copy: chunk-major, so that each chunk's [B*H, c, D]
    is contiguous for the products of the loop over chunks; zeros after the end of time.

    shift: token t + 1 at position t (a reverse scan's gates: step t decays by token t + 1's gate)."""
    B, T, H, D = x.shape
    if shift:
        x, T = x[:, 1:], T - 1
    out = x.new_empty(N, B, H, c, D, dtype=dtype)
    full = T // c  # chunks filled entirely
    out[:full].copy_(x[:, : full * c].reshape(B, full, c, H, D).permute(1, 0, 3, 2, 4))
    if full < N:
        out[full:].zero_()
        out[full, :, :, : T - full * c].copy_(x[:, full * c :].transpose(1, 2))  # (B, H, rest, D)
    return out.view(N, B * H, c, D)


def _from_chunks(x: Tensor, B: int, T: int, dtype: torch.dtype) -> Tensor:
    """[N, B*H, c, D] -> [B, T, H, D] in `dtype`, in one copy."""
    N, BH, c, D = x.shape
    H = BH // B
    out = x.new_empty(B, T, H, D, dtype=dtype)
    x = x.view(N, B, H, c, D)
    full = T // c
    out[:, : full * c].view(B, full, c, H, D).copy_(x[:full].permute(1, 0, 3, 2, 4))
    if full < N:
        out[:, full * c :].copy_(x[full, :, :, : T - full * c].transpose(1, 2))
    return out


def chunk_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None,
    log_value_gate: Tensor | None,
    initial_state: Tensor | None,
    *,
    reverse: bool = False,
    out_dtype: torch.dtype | None = None,
    output_pre: bool = False,
    output_final_state: bool = False,
    output_final_pre_state: bool = False,
    gate_grad_inputs: tuple[Tensor, Tensor, Tensor | None] | None = None,
    chunk_size: int = 16,
) -> ScanResult:
    """closed_form.Scan by chunks of `chunk_size` tokens (the module docstring): the same results as
    scan_reference. Log-gates [B, T, H, K|V], or [B, T, H, 1] (one per head), or None; pick chunk_size
    with `chunk_size_for` (a chunk that decays by more than max_chunk_decay would overflow)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(torch.promote_types(q.dtype, v.dtype))
    c = chunk_size
    N = max(-(-T // c), 1)
    floor = log_gate_floor(acc)
    qc, kc, vc = (_to_chunks(x, c, N, acc) for x in (q, k, v))  # (N, BH, c, K|V)
    # Decays accumulated in the scan's order from the chunk's start (forward: prefix sums; reverse:
    # suffix sums of the shifted gates), by a product with a triangle of ones.
    ones = torch.ones(c, c, dtype=acc, device=q.device)
    running_sum = ones.triu() if reverse else ones.tril()  # (t, s): s at or before t in the scan's order
    a, d = (
        None if g is None else running_sum @ _to_chunks(g, c, N, acc, shift=reverse).clamp_min_(floor)
        for g in (log_key_gate, log_value_gate)
    )  # (N, BH, c, K|V or 1)
    first, last = (c - 1, 0) if reverse else (0, c - 1)  # positions of a chunk's first and last step

    # Factor every decay within a chunk through half the chunk's: e^{a_t - a_s} = e^{a_t - m} e^{m - a_s},
    # m = a_last / 2. Reads of the state at the chunk's start and writes to it at its end use the exact
    # decays, e^{a_t} = e^{a_t - m} e^m and e^{a_last - a_s} = e^{m - a_s} e^m, all <= 1.
    q_in, k_in, v_in = qc, kc, vc  # the factored inputs of the products within a chunk
    q_read, k_write, v_write = qc, kc, vc  # q e^{a}, k e^{a_last - a}, v e^{d_last - d}
    key_decay = value_decay = value_scale = value_half = None
    if a is not None:
        half = a[:, :, last : last + 1] / 2  # m (N, BH, 1, K|1)
        key_scale = (a - half).exp()  # e^{a - m} in [e^{-R/2}, e^{R/2}]
        q_in, k_in = qc * key_scale, kc / key_scale
        half = half.exp()
        q_read, k_write = q_in * half, k_in * half
        key_decay = half.square().transpose(-1, -2)  # e^{a_last} as a column (N, BH, K|1, 1)
    if d is not None:
        half = d[:, :, last : last + 1] / 2  # n (N, BH, 1, V|1)
        value_scale = (d - half).exp()  # e^{d - n}
        v_in = vc / value_scale
        value_half = half.exp()
        v_write = v_in * value_half
        value_decay = value_half.square()  # e^{d_last} as a row (N, BH, 1, V|1)

    # Within chunks: tokens strictly before in the scan's order, and the token's own term (the diagonal).
    scores = q_in @ k_in.transpose(-1, -2)  # (N, BH, c, c)
    own = scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).clone()  # q_t . k_t (N, BH, c, 1)
    o_pre = (scores.triu_(1) if reverse else scores.tril_(-1)) @ v_in  # (N, BH, c, V)
    # The state, [B, H, K, V] (returned as is: a view would be an output that cannot be written in place).
    final = (
        q.new_zeros(B, H, K, V, dtype=acc)
        if initial_state is None
        else initial_state.to(acc).clone(memory_format=torch.contiguous_format)
    )
    S = final.view(B * H, K, V)  # updated in place
    o_read = torch.empty_like(o_pre)  # q_t e^{a_t} S (N, BH, c, V), e^{d_t} to come
    final_pre = None
    last_chunk = 0 if reverse else N - 1
    for i in reversed(range(N)) if reverse else range(N):
        torch.bmm(q_read[i], S, out=o_read[i])  # (BH, c, V)
        if key_decay is not None:
            S.mul_(key_decay[i])
        if value_decay is not None:
            S.mul_(value_decay[i])
        if output_final_pre_state and i == last_chunk:  # P at the last step: without that step's write
            steps = slice(1, c) if reverse else slice(0, (T - 1) % c)
            final_pre = torch.baddbmm(S, k_write[i, :, steps].transpose(-1, -2), v_write[i, :, steps])
        S.baddbmm_(k_write[i].transpose(-1, -2), v_write[i])  # (BH, K, V)
    if value_scale is not None and value_half is not None:  # e^{d_t} = e^{d_t - n} e^n (set together)
        o_pre = o_pre.add_(o_read.mul_(value_half)).mul_(value_scale)
    else:
        o_pre = o_pre.add_(o_read)
    out = None
    if out_dtype is not None:  # the own term added, never subtracted
        out = _from_chunks(torch.addcmul(o_pre, own, vc), B, T, out_dtype)
    if reverse:
        o_pre[N - 1, :, (T - 1) % c] = 0.0  # the initial state counts as written at the first step
        for g, side in ((log_key_gate, -1), (log_value_gate, -2)):  # the final state decays once more
            if g is not None:
                final = final * g[:, 0].to(acc).clamp_min(floor).exp().unsqueeze(
                    side
                )  # (B, H, K, 1) or (B, H, 1, V)

    gate_grad = None
    if gate_grad_inputs is not None:  # r = start + running sum of x1 v - x2 out_pre, in the scan's order
        x1, x2, start = gate_grad_inputs
        terms = _to_chunks(x1, c, N, acc) * vc - _to_chunks(x2, c, N, acc) * o_pre  # (N, BH, c, V)
        sums = running_sum @ terms
        before = sums[:, :, last].flip(0).cumsum(0).flip(0) if reverse else sums[:, :, last].cumsum(0)
        before = before - sums[:, :, last]  # the chunks earlier in the scan's order (N, BH, V)
        if start is not None:
            before = before + start.to(acc).reshape(B * H, V)
        gate_grad = _from_chunks(sums + before.unsqueeze(2), B, T, acc)

    return ScanResult(
        out=out,
        out_pre=_from_chunks(o_pre, B, T, acc) if output_pre else None,
        final_state=final if output_final_state else None,
        final_pre_state=None if final_pre is None else final_pre.reshape(B, H, K, V),
        gate_grad=gate_grad,
    )


def chunked_decay_fast_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None = None,
    log_value_gate: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Same arguments and results as reference.chunk_decay_fast_weights; the backward recomputes by chunks.

    chunk_size: the largest chunk; halved while some chunk would decay by more than max_chunk_decay.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    acc = accumulation_dtype(torch.promote_types(q.dtype, v.dtype))
    c = chunk_size_for(log_key_gate, log_value_gate, chunk_size, acc)
    scan = lambda *args, **kwargs: chunk_scan(*args, **kwargs, chunk_size=c)
    return ScanDecayFastWeights.apply(
        scan,
        q,
        k,
        v,
        log_key_gate,
        log_value_gate,
        None if initial_state is None else initial_state.to(acc),
        output_final_state,
    )
