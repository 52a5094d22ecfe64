"""The chunked tensor-core form of the DFW scan in Triton (`kernel="triton"`; opt-in, see README).

One primitive, the scan of closed_form.py (`scan_reference` is its specification), computed chunk by
chunk with the stable chunkwise form of docs/math.md, so that the forward pass is one scan and
the backward pass three (dq, dv and dS_0, dk), with closed_form's cancellation-free gate gradients:
`ScanDecayFastWeights` runs the very code the CUDA path runs, with `triton_scan` as its scan.

One program owns one (batch, head) and a block of BV value columns of the K x V state, kept in float32
registers, and walks the chunks of C tokens in scan order (reversed for the backward's adjoint scans).
Inside a chunk, split into sub-chunks of SUB = 16 tokens, with a = chunk-local cumulative log key-gate
and d = the value-side one (every exponent taken is <= 0):

- state read:        q_t S_prev -> [(Q_J * e^{a_J}) @ S_prev] * e^{d_J}                    (tl.dot)
- earlier sub-chunks I < J, all at once, through the boundary b = the last token before J:
      [(Q_J * e^{a_J - a_b}) @ (K_<J * e^{a_b - a_<J})^T] @ (V_<J * e^{d_b - d_<J}), then * e^{d_J - d_b}
  (two tl.dots over the chunk's keys, those of J and later masked to 0 before the exp)
- diagonal sub-chunk: pairwise decays e^{a_t - a_s}, e^{d_t - d_s} for s < t elementwise (masked before
  exp), plus the token's own write (q_t . k_t) v_t, kept apart so the scan returns both
  `out` = q_t S_t and `out_pre` = q_t P_t (the read before the write);
- state to the next chunk: e^{a_C} S e^{d_C} + (K * e^{a_C - a})^T @ (V * e^{d_C - d})       (tl.dot)

No per-token state is ever written: only outputs of the size of q, k, v and the chunk-local cumulative
log-gates (computed here in PyTorch, like fla's chunk_local_cumsum, as float32 hi + lo pairs of a
float64 sum: see `_chunk_local_cumsum`). Matmul operands are cast to the
input dtype (float32 inputs: IEEE float32 products; bfloat16/float16: tensor-core inputs), every
accumulation is float32. fla's `fla/ops/gla/chunk.py` (key gate only) was the design anchor.

On CPU tensors the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1 set before Python
imports triton): that is how the tests run it without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .closed_form import ScanDecayFastWeights, ScanResult
from .reference import log_gate_floor

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: `pip install -e .[dev]` (Linux x86_64) brings Triton
    triton = tl = None

MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 64  # C: tokens per chunk (the state is carried between chunks)
SUBCHUNK = 16  # c: tokens per sub-chunk (the smallest tl.dot tile)

# Tests set this: every output is NaN-filled before the kernel runs, so an unwritten one cannot pass.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """Whether the kernel was defined under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and not isinstance(_chunk_scan_kernel, triton.runtime.JITFunction)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why these inputs cannot take the Triton path, or None (cheap: compiles nothing)."""
    if triton is None:
        return "Triton is not installed (pip install triton; Linux x86_64 wheels run without a GPU)"
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in DTYPES:
        return f"the Triton kernel takes float32, bfloat16 or float16, got {dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"the Triton kernel takes key and value sizes up to {MAX_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}"
    if q.device.type == "cuda" or interpreting():
        return None
    return (
        f"the inputs are on {q.device.type}: the Triton kernel runs CUDA tensors, or CPU tensors in Triton's "
        "interpreter only (set TRITON_INTERPRET=1 in the environment before Python starts; slow, for tests)"
    )


if triton is not None:

    @triton.jit
    def _chunk_scan_kernel(
        q, k, v, acum, dcum, lo_a, lo_d, s0, r0, x1, x2,  # inputs (unused pointers are dummies, never read)
        out, out_pre, gate_grad, final, final_pre,  # outputs
        T, n_chunks, H, K, V,
        REVERSE: tl.constexpr, HAS_S0: tl.constexpr, HAS_R0: tl.constexpr, WRITE_OUT: tl.constexpr,
        WRITE_PRE: tl.constexpr, GATE_GRAD: tl.constexpr, WRITE_FINAL: tl.constexpr,
        WRITE_FINAL_PRE: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
        BV: tl.constexpr, BKD: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """q, k [B, T, H, K]; v, x1, x2, out, out_pre, gate_grad [B, T, H, V]: token order.
        acum [2, B, NC, H, K], dcum [2, B, NC, H, V]: chunk-local cumulative log-gates in scan order as
        hi, lo float32 pairs (lo at offsets lo_a, lo_d), NC = n_chunks * C (log-gates 0 beyond T).
        s0, final, final_pre [B, H, K, V]; r0 [B, H, V]. Grid: (cdiv(V, BV), B * H)."""
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // H
        i_h = i_bh % H
        ck = tl.arange(0, BK)  # (BK,) key columns
        cv = i_v * BV + tl.arange(0, BV)  # (BV,) value columns of this program
        mk = ck < K
        mv = cv < V
        rows = tl.arange(0, SUB)  # (SUB,) rows of a sub-chunk
        dt = q.dtype.element_ty
        base_k = (i_b.to(tl.int64) * T * H + i_h) * K  # (b, t=0, h, 0) of a [B, T, H, K] tensor
        base_v = (i_b.to(tl.int64) * T * H + i_h) * V
        base_a = (i_b.to(tl.int64) * n_chunks * C * H + i_h) * K  # the same in [B, NC, H, K]
        base_d = (i_b.to(tl.int64) * n_chunks * C * H + i_h) * V
        base_s = i_bh.to(tl.int64) * K * V
        mkv = mk[:, None] & mv[None, :]
        HK = H * K  # row (token) strides of [B, T, H, K] and [B, T, H, V] tensors
        HV = H * V

        S = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV) the state at the chunk's start
        if HAS_S0:
            S = tl.load(s0 + base_s + ck[:, None] * V + cv[None, :], mask=mkv, other=0.0)
        r = tl.zeros([BV], dtype=tl.float32)  # running sum of the gate-gradient epilogue
        if HAS_R0:
            r = tl.load(r0 + i_bh.to(tl.int64) * V + cv, mask=mv, other=0.0)

        rows_c = tl.arange(0, C)  # (C,) rows of a chunk
        causal = (rows[:, None] > rows[None, :])[:, :, None]  # (SUB, SUB, 1) key s strictly before query t
        for n in range(0, n_chunks):
            start = n * C
            # The whole chunk's keys and values (token order), its cumulative log-gates (scan order).
            sc = start + rows_c  # (C,) scan steps
            if REVERSE:
                tok_c = T - 1 - sc
            else:
                tok_c = sc
            ok_c = sc < T
            off_c = tok_c[:, None] * HK + ck[None, :]  # (C, BK) into q, k
            off_vc = tok_c[:, None] * HV + cv[None, :]  # (C, BV) into v
            k_c = tl.load(k + base_k + off_c, mask=ok_c[:, None] & mk[None, :], other=0.0).to(tl.float32)
            v_c = tl.load(v + base_v + off_vc, mask=ok_c[:, None] & mv[None, :], other=0.0).to(tl.float32)
            a_c = tl.load(
                acum + base_a + sc[:, None] * HK + ck[None, :], mask=mk[None, :], other=0.0
            )  # (C, BK)
            a_c_lo = tl.load(
                acum + lo_a + base_a + sc[:, None] * HK + ck[None, :], mask=mk[None, :], other=0.0
            )
            d_c = tl.load(
                dcum + base_d + sc[:, None] * HV + cv[None, :], mask=mv[None, :], other=0.0
            )  # (C, BV)
            d_c_lo = tl.load(
                dcum + lo_d + base_d + sc[:, None] * HV + cv[None, :], mask=mv[None, :], other=0.0
            )

            for J in tl.static_range(C // SUB):
                si = start + J * SUB + rows  # (SUB,) scan steps
                ok = si < T
                if REVERSE:
                    tok = T - 1 - si
                else:
                    tok = si
                off_k = tok[:, None] * HK + ck[None, :]  # (SUB, BK)
                off_v = tok[:, None] * HV + cv[None, :]  # (SUB, BV): also the outputs'
                m_k = ok[:, None] & mk[None, :]
                m_v = ok[:, None] & mv[None, :]
                q_J = tl.load(q + base_k + off_k, mask=m_k, other=0.0).to(tl.float32)  # (SUB, BK)
                k_J = tl.load(k + base_k + off_k, mask=m_k, other=0.0).to(tl.float32)
                v_J = tl.load(v + base_v + off_v, mask=m_v, other=0.0).to(tl.float32)  # (SUB, BV)
                a_J = tl.load(acum + base_a + si[:, None] * HK + ck[None, :], mask=mk[None, :], other=0.0)
                a_J_lo = tl.load(
                    acum + lo_a + base_a + si[:, None] * HK + ck[None, :], mask=mk[None, :], other=0.0
                )
                d_J = tl.load(dcum + base_d + si[:, None] * HV + cv[None, :], mask=mv[None, :], other=0.0)
                d_J_lo = tl.load(
                    dcum + lo_d + base_d + si[:, None] * HV + cv[None, :], mask=mv[None, :], other=0.0
                )

                # The state from earlier chunks: q_t P_t's first term.
                o_state = tl.dot((q_J * tl.exp(a_J + a_J_lo)).to(dt), S.to(dt), input_precision=PRECISION)
                o_state = o_state * tl.exp(d_J + d_J_lo)  # (SUB, BV)
                # Earlier sub-chunks of this chunk, factored through the boundary b = the step before J.
                # Keys of sub-chunk J and later are masked (before exp: their exponents would be > 0).
                o_before = tl.zeros([SUB, BV], dtype=tl.float32)
                if J > 0:
                    b = start + J * SUB - 1
                    a_b = tl.load(acum + base_a + b * HK + ck, mask=mk, other=0.0)  # (BK,)
                    a_b_lo = tl.load(acum + lo_a + base_a + b * HK + ck, mask=mk, other=0.0)
                    d_b = tl.load(dcum + base_d + b * HV + cv, mask=mv, other=0.0)  # (BV,)
                    d_b_lo = tl.load(dcum + lo_d + base_d + b * HV + cv, mask=mv, other=0.0)
                    before = (rows_c < J * SUB)[:, None]  # (C, 1)
                    q_dec = (q_J * tl.exp((a_J - a_b[None, :]) + (a_J_lo - a_b_lo[None, :]))).to(
                        dt
                    )  # (SUB, BK)
                    k_dec = (
                        k_c
                        * tl.exp(
                            tl.where(before, (a_b[None, :] - a_c) + (a_b_lo[None, :] - a_c_lo), float("-inf"))
                        )
                    ).to(dt)  # (C, BK)
                    v_dec = (
                        v_c
                        * tl.exp(
                            tl.where(before, (d_b[None, :] - d_c) + (d_b_lo[None, :] - d_c_lo), float("-inf"))
                        )
                    ).to(dt)  # (C, BV)
                    scores = tl.dot(q_dec, tl.trans(k_dec), input_precision=PRECISION)  # (SUB, C)
                    o_before = tl.dot(scores.to(dt), v_dec, input_precision=PRECISION)  # (SUB, BV)
                    o_before = o_before * tl.exp((d_J - d_b[None, :]) + (d_J_lo - d_b_lo[None, :]))
                # The diagonal sub-chunk, s < t: pairwise decays, masked before exp. Scores over key
                # columns in slices of BKD (reloaded: registers cannot be sliced), values at once.
                if BKD == BK:  # the sub-chunk's tiles as loaded
                    key_decay = tl.exp(
                        tl.where(
                            causal,
                            (a_J[:, None, :] - a_J[None, :, :]) + (a_J_lo[:, None, :] - a_J_lo[None, :, :]),
                            float("-inf"),
                        )
                    )
                    scores_diag = tl.sum(q_J[:, None, :] * k_J[None, :, :] * key_decay, axis=2)  # (SUB, SUB)
                else:
                    scores_diag = tl.zeros([SUB, SUB], dtype=tl.float32)
                    for kb in tl.static_range(BK // BKD):
                        cd = kb * BKD + tl.arange(0, BKD)  # (BKD,)
                        m = ok[:, None] & (cd < K)[None, :]
                        off_d = tok[:, None] * HK + cd[None, :]
                        q_d = tl.load(q + base_k + off_d, mask=m, other=0.0).to(tl.float32)
                        k_d = tl.load(k + base_k + off_d, mask=m, other=0.0).to(tl.float32)
                        a_d = tl.load(
                            acum + base_a + si[:, None] * HK + cd[None, :], mask=(cd < K)[None, :], other=0.0
                        )
                        a_d_lo = tl.load(
                            acum + lo_a + base_a + si[:, None] * HK + cd[None, :],
                            mask=(cd < K)[None, :],
                            other=0.0,
                        )
                        key_decay = tl.exp(
                            tl.where(
                                causal,
                                (a_d[:, None, :] - a_d[None, :, :])
                                + (a_d_lo[:, None, :] - a_d_lo[None, :, :]),
                                float("-inf"),
                            )
                        )
                        scores_diag += tl.sum(q_d[:, None, :] * k_d[None, :, :] * key_decay, axis=2)
                value_decay = tl.exp(
                    tl.where(
                        causal,
                        (d_J[:, None, :] - d_J[None, :, :]) + (d_J_lo[:, None, :] - d_J_lo[None, :, :]),
                        float("-inf"),
                    )
                )
                o_diag = tl.sum(scores_diag[:, :, None] * v_J[None, :, :] * value_decay, axis=1)  # (SUB, BV)
                own = tl.sum(q_J * k_J, axis=1)[:, None] * v_J  # (SUB, BV) the token's own write

                if REVERSE:  # the initial state counts as written at the first step: not in out_pre there
                    pre = tl.where((si > 0)[:, None], o_state, 0.0) + o_before + o_diag
                else:
                    pre = o_state + o_before + o_diag
                store_mask = m_v
                out_offsets = base_v + off_v
                if WRITE_OUT:
                    o = o_state + o_before + o_diag + own
                    tl.store(out + out_offsets, o.to(out.dtype.element_ty), mask=store_mask)
                if WRITE_PRE:
                    tl.store(out_pre + out_offsets, pre, mask=store_mask)
                if GATE_GRAD:  # r += x1_t * v_t - x2_t * out_pre_t, gate_grad_t = r, in scan order
                    x1_J = tl.load(x1 + out_offsets, mask=store_mask, other=0.0).to(tl.float32)
                    x2_J = tl.load(x2 + out_offsets, mask=store_mask, other=0.0).to(tl.float32)
                    terms = x1_J * v_J - x2_J * pre  # (SUB, BV), 0 beyond T
                    tl.store(gate_grad + out_offsets, tl.cumsum(terms, axis=0) + r[None, :], mask=store_mask)
                    r += tl.sum(terms, axis=0)

            # The state to the next chunk. The very last step's write is left out here and added after
            # the loop, so that P at the last step (the state before its write) never comes from a
            # difference. Beyond T the log-gates are 0, so the chunk's end is the last step's decay.
            e = start + C - 1
            a_e = tl.load(acum + base_a + e * HK + ck, mask=mk, other=0.0)  # (BK,)
            a_e_lo = tl.load(acum + lo_a + base_a + e * HK + ck, mask=mk, other=0.0)
            d_e = tl.load(dcum + base_d + e * HV + cv, mask=mv, other=0.0)  # (BV,)
            d_e_lo = tl.load(dcum + lo_d + base_d + e * HV + cv, mask=mv, other=0.0)
            write = (sc < T - 1)[:, None]  # (C, 1)
            k_dec = (
                tl.where(write, k_c, 0.0) * tl.exp((a_e[None, :] - a_c) + (a_e_lo[None, :] - a_c_lo))
            ).to(dt)  # (C, BK)
            v_dec = (v_c * tl.exp((d_e[None, :] - d_c) + (d_e_lo[None, :] - d_c_lo))).to(dt)  # (C, BV)
            S = S * tl.exp(a_e + a_e_lo)[:, None] * tl.exp(d_e + d_e_lo)[None, :]
            S += tl.dot(tl.trans(k_dec), v_dec, input_precision=PRECISION)  # (BK, BV)

        state_offsets = base_s + ck[:, None] * V + cv[None, :]
        if WRITE_FINAL_PRE:
            tl.store(final_pre + state_offsets, S, mask=mkv)
        if WRITE_FINAL:
            if REVERSE:
                tok_last = 0
            else:
                tok_last = T - 1
            k_last = tl.load(k + base_k + tok_last * H * K + ck, mask=mk, other=0.0).to(tl.float32)
            v_last = tl.load(v + base_v + tok_last * H * V + cv, mask=mv, other=0.0).to(tl.float32)
            tl.store(final + state_offsets, S + k_last[:, None] * v_last[None, :], mask=mkv)

else:
    _chunk_scan_kernel = None


def _chunk_local_cumsum(
    log_gate: Tensor | None, width: int, like: Tensor, reverse: bool, n_pad: int
) -> Tensor:
    """[B, T, H, D] log-gates (or None: zeros) -> [2, B, NC, H, D]: cumulative sums from each chunk's
    start in scan order (reversed, step i takes the gate of token T - i; none at the first step), as
    float32 pairs hi + lo of the float64 sum.

    Why pairs: the kernel takes decays as differences a_t - a_s of these sums. In one float32 the sums
    reach hundreds of nats within a chunk when gates are small, and the difference of two of them
    keeps only ~|a| * 6e-8 absolute accuracy (1e-5 relative error on a one-step decay with gates
    ~2e-3). (hi_t - hi_s) + (lo_t - lo_s) is accurate to float32 rounding of the difference itself.
    """
    B, T, H = like.shape[:3]
    if log_gate is None:
        return like.new_zeros(2, B, T + n_pad, H, width, dtype=torch.float32)
    g = log_gate.double()
    if reverse:  # scan step i (token T-1-i) applies the gate of token T-i before its write
        g = torch.cat([g.new_zeros(B, 1, H, width), g.flip(1)[:, : T - 1]], dim=1)  # (B, T, H, D)
    g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, n_pad))  # (B, NC, H, D)
    total = g.view(B, -1, CHUNK, H, width).cumsum(2).view(B, -1, H, width)  # (B, NC, H, D) float64
    hi = total.float()
    return torch.stack([hi, (total - hi.double()).float()])  # (2, B, NC, H, D)


def _empty(shape, dtype, like: Tensor) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tiles(K: int, V: int) -> dict:
    """Tile sizes and warps for key size K and value size V (<= 128): all of K in one program, V in
    blocks of BV <= 32 (one program each: more programs, and [SUB, SUB, BV] diagonal terms that fit
    registers), the diagonal's key-side terms in slices of BKD = 16 columns; 8 warps from K = 64 on."""
    BK, BV = max(16, _next_power_of_2(K)), min(32, max(16, _next_power_of_2(V)))
    # num_stages=1: no software pipelining of the chunk loop's loads (with it, compiling takes minutes
    # and the async copies need more shared memory; a tuning question for a GPU session).
    return {"BK": BK, "BV": BV, "BKD": min(BK, 16), "num_warps": 4 if BK <= 32 else 8, "num_stages": 1}


def triton_scan(
    q, k, v, log_key_gate, log_value_gate, initial_state, *, reverse=False, out_dtype=None, output_pre=False,
    output_final_state=False, output_final_pre_state=False, gate_grad_inputs=None,
) -> ScanResult:  # fmt: skip
    """closed_form.Scan with the Triton kernel: the same arguments and results as `scan_reference`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    n_pad = (-T) % CHUNK
    acum = _chunk_local_cumsum(log_key_gate, K, q, reverse, n_pad)  # (2, B, NC, H, K)
    dcum = _chunk_local_cumsum(log_value_gate, V, q, reverse, n_pad)  # (2, B, NC, H, V)
    dummy = acum
    out = _empty((B, T, H, V), out_dtype, q) if out_dtype is not None else dummy
    out_pre = _empty((B, T, H, V), torch.float32, q) if output_pre else dummy
    final = _empty((B, H, K, V), torch.float32, q) if output_final_state or output_final_pre_state else dummy
    final_pre = _empty((B, H, K, V), torch.float32, q) if output_final_pre_state else dummy
    x1 = x2 = r0 = gate_grad = None
    if gate_grad_inputs is not None:
        x1, x2, r0 = gate_grad_inputs
        x1, x2 = x1.contiguous(), x2.contiguous()
        r0 = None if r0 is None else r0.float().contiguous()
        gate_grad = _empty((B, T, H, V), torch.float32, q)
    s0 = None if initial_state is None else initial_state.float().contiguous()
    tiles = _tiles(K, V)
    if T > 0:
        grid = (triton.cdiv(V, tiles["BV"]), B * H)
        _chunk_scan_kernel[grid](
            q, k, v, acum, dcum, acum[0].numel(), dcum[0].numel(),
            dummy if s0 is None else s0, dummy if r0 is None else r0,
            dummy if x1 is None else x1, dummy if x2 is None else x2,
            out, out_pre, dummy if gate_grad is None else gate_grad, final, final_pre,
            T, triton.cdiv(T, CHUNK), H, K, V,
            REVERSE=reverse, HAS_S0=s0 is not None, HAS_R0=r0 is not None, WRITE_OUT=out_dtype is not None,
            WRITE_PRE=output_pre, GATE_GRAD=gate_grad is not None,
            WRITE_FINAL=output_final_state or output_final_pre_state, WRITE_FINAL_PRE=output_final_pre_state,
            C=CHUNK, SUB=SUBCHUNK, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **tiles,
        )  # fmt: skip
    else:  # nothing to scan: the state passes through
        final = final_pre = q.new_zeros(B, H, K, V, dtype=torch.float32) if s0 is None else s0
    if reverse and output_final_state and T > 0:  # one more decay, by the gates of token 0
        if log_key_gate is not None:
            final = final * log_key_gate[:, 0].float().exp().unsqueeze(-1)  # (B, H, K, 1)
        if log_value_gate is not None:
            final = final * log_value_gate[:, 0].float().exp().unsqueeze(-2)  # (B, H, 1, V)
    return ScanResult(
        out=out if out_dtype is not None else None,
        out_pre=out_pre if output_pre else None,
        final_state=final if output_final_state else None,
        final_pre_state=final_pre if output_final_pre_state else None,
        gate_grad=gate_grad,
    )


def decay_fast_weights_triton(q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state):
    """The Triton path of `decay_fast_weights` (same arguments and returns)."""
    from .cuda import _full_width

    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise RuntimeError(f"kernel='triton' cannot run: {reason}. Use kernel='auto' or 'torch'.")
    K, V = q.shape[-1], v.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # Chunk-local cumulative sums of log-gates: a -inf (a gate of exactly 0) would give -inf - -inf = NaN,
    # so log-gates are raised to a floor whose exp is already 0 (as in the PyTorch chunked forms).
    floor = log_gate_floor(torch.float32)
    log_key_gate = _full_width(None if log_key_gate is None else log_key_gate.float().clamp_min(floor), K)  # (B, T, H, K)
    log_value_gate = _full_width(None if log_value_gate is None else log_value_gate.float().clamp_min(floor), V)  # (B, T, H, V)
    if initial_state is not None:
        initial_state = initial_state.float()
    return ScanDecayFastWeights.apply(
        triton_scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
    )


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_ahead_of_time(arch: int, dtype: torch.dtype, K: int, V: int, *, reverse: bool = False) -> dict:
    """Compile the kernel for a CUDA compute capability (80, 90, ...) without a GPU: triton.compile with
    a GPUTarget, the way `triton_scan` would launch it (the reverse variant with the gate-gradient
    epilogue, as the backward's adjoint scans run). Needs Triton outside the interpreter.
    Returns sizes of the PTX and cubin, the shared memory the launch needs, and the cubin's registers
    per thread where cuobjdump (bundled with Triton) reads them (else -1)."""
    import re
    import shutil
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget

    if interpreting():
        raise RuntimeError(
            "compile_ahead_of_time needs Triton outside its interpreter (unset TRITON_INTERPRET)"
        )
    t = _TRITON_DTYPES[dtype]
    pointers = {"q": t, "k": t, "v": t, "acum": "fp32", "dcum": "fp32", "s0": "fp32", "r0": "fp32",
                "x1": "fp32", "x2": t, "out": t, "out_pre": "fp32", "gate_grad": "fp32", "final": "fp32",
                "final_pre": "fp32"}  # fmt: skip
    tiles = _tiles(K, V)
    options = {"num_warps": tiles.pop("num_warps"), "num_stages": tiles.pop("num_stages")}
    constexprs = dict(
        REVERSE=reverse, HAS_S0=True, HAS_R0=reverse, WRITE_OUT=True, WRITE_PRE=not reverse, GATE_GRAD=reverse,
        WRITE_FINAL=True, WRITE_FINAL_PRE=not reverse, C=CHUNK, SUB=SUBCHUNK,
        PRECISION="ieee" if dtype == torch.float32 else "tf32", **tiles,
    )  # fmt: skip
    signature = {n: "*" + ty for n, ty in pointers.items()}
    signature = {
        **{n: signature[n] for n in ("q", "k", "v", "acum", "dcum")},
        "lo_a": "i32",
        "lo_d": "i32",
        **signature,
    }
    signature.update(dict.fromkeys(("T", "n_chunks", "H", "K", "V"), "i32"))
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = triton.compiler.ASTSource(fn=_chunk_scan_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers = stack = -1
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists() or shutil.which("cuobjdump"):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            exe = str(cuobjdump) if cuobjdump.exists() else "cuobjdump"
            usage = subprocess_output([exe, "--dump-resource-usage", f.name])
        match = re.search(r"REG:(\d+)", usage)
        registers = int(match.group(1)) if match else -1
        match = re.search(r"STACK:(\d+)", usage)
        stack = int(match.group(1)) if match else -1
    return {
        "ptx_bytes": len(compiled.asm["ptx"]),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared": compiled.metadata.shared,
        "registers": registers,
        "stack_bytes": stack,  # per thread: > 0 means registers spill to local memory
        "num_warps": compiled.metadata.num_warps,
    }


def subprocess_output(command: list[str]) -> str:
    """stdout+stderr of a command, '' if it cannot run."""
    import subprocess

    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except OSError:
        return ""
    return run.stdout + run.stderr
