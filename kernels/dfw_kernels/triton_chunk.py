"""The chunked tensor-core form of the DFW scan in Triton (`kernel="triton"`; opt-in, see docs/kernels.md).

One primitive, the scan of closed_form.py (`scan_reference` is its specification), computed chunk by
chunk with the stable chunkwise form of docs/math.md, so that the forward pass is one scan and the
backward pass three, with closed_form's cancellation-free gate gradients:
`ScanDecayFastWeights` runs the very code the CUDA path runs, with `triton_scan` as its scan.

A scan is three kernels, each small enough to keep its tiles in registers (`python -m dfw_kernels aot`
prints their registers and spills for a GPU target):

1. `_chunk_states_kernel`, sequential over chunks of C tokens: one program per (batch, head) and
   block of the float32 K x V state; it stores the state at the start of every chunk,
   h [B, NC, H, K, V] (NC = ceil(T / C): a state per chunk, never one per token), and the final
   states. Per chunk: S <- diag(e^{a_C}) S diag(e^{d_C}) + (K * e^{a_C - a})^T (V * e^{d_C - d}).
2. `_chunk_output_kernel`, parallel over chunks: one program per (chunk, batch, head) and block of
   value columns. It starts from the chunk's state h_n and walks the chunk's sub-chunks of SUB = 16
   tokens, carrying the state from one to the next in registers. A sub-chunk reads the state with one
   tl.dot, (Q * e^{a}) @ S * e^{d}, and adds its own keys' contributions one key at a time (the
   diagonal: pairwise decays e^{a_t - a_s}, e^{d_t - d_s} for s < t as 2-D tiles, never a 3-D
   broadcast), plus each token's own write (q_t . k_t) v_t, kept apart so the scan returns both
   `out` = q_t S_t and `out_pre` = q_t P_t (the read before the write).
3. `_gate_grad_prefix_kernel` (the reverse scans' gate-gradient epilogue only): kernel 2 writes each
   chunk's running sum of x1_t * v_t - x2_t * out_pre_t from the chunk's start and the chunk's total;
   this adds the totals of the chunks before (and r0).

Here a and d are cumulative log-gates (key and value side), and every exponent the kernels take is a
sum of log-gates over an interval of steps, summed directly (never the difference of two running
sums: with small gates those reach hundreds of nats, and their difference would keep only ~1e-5 of
a one-step decay in float32). Within a sub-chunk the diagonal runs over keys from the last to the
first, so the exponent of each (query, key) pair grows by one gate per key. Log-gates are read as
they are (any strides, [B, T, H, 1] broadcast) and raised to a finite floor (-inf would give
-inf - -inf = NaN): no temporary of their size is made.

Matmul operands are cast to the input dtype (float32 inputs: IEEE float32 products; bfloat16/float16:
tensor-core inputs), every accumulation is float32. Tile sizes, warps and stages are fixed per head
size in `_tiles` (the AOT report shows they do not spill at the GPT-2 shape); T is not specialised, so
one compile serves every sequence length. fla's chunk_gla (key gate only, fla/ops/gla/chunk.py) shaped
the design: separate kernels per stage, the diagonal a key at a time.

On CPU tensors the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before Python
imports triton): that is how the tests run them without a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import full_width, input_dtype, new_output
from .closed_form import ScanDecayFastWeights, ScanResult
from .reference import log_gate_floor

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: `pip install -e .[dev]` (Linux x86_64) brings Triton
    triton = tl = None

CHUNK = 32  # C: tokens per chunk; one state per chunk is stored between kernels 1 and 2
SUBCHUNK = 16  # tokens per sub-chunk (the smallest tl.dot tile), whose diagonal runs a key at a time
# The floor log-gates are raised to as the kernels read them (the literal -128.0 in `_step_gates`):
# exp of it, and of any sum with it, is 0 in float32.
LOG_GATE_FLOOR = log_gate_floor(torch.float32)
assert LOG_GATE_FLOOR == -128.0


def interpreting() -> bool:
    """Whether the kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and not isinstance(_chunk_output_kernel, triton.runtime.JITFunction)


if triton is not None:

    @triton.jit
    def _step_gates(gate, base, steps, T, cols, col_mask, stride_t, stride_d, REVERSE: tl.constexpr):
        """The log-gates applied at scan steps `steps` (a vector) for columns `cols`: [len(steps), len(cols)].

        Forward, step i applies token i's gate; reversed, step i (token T-1-i) applies the gate of token
        T-i, and none at step 0. 0 beyond T; raised to the floor."""
        if REVERSE:
            tok = T - steps
            valid = (steps >= 1) & (steps < T)
        else:
            tok = steps
            valid = steps < T
        x = tl.load(
            gate + base + tok[:, None] * stride_t + cols[None, :] * stride_d,
            mask=valid[:, None] & col_mask[None, :],
            other=0.0,
        )
        return tl.maximum(x.to(tl.float32), -128.0)  # LOG_GATE_FLOOR

    @triton.jit(do_not_specialize=["T"])
    def _chunk_states_kernel(
        k,
        v,
        gk,
        gv,
        s0,
        h,
        final,
        final_pre,
        T,
        H,
        K,
        V,
        gk_sb,
        gk_st,
        gk_sh,
        gk_sd,
        gv_sb,
        gv_st,
        gv_sh,
        gv_sd,
        REVERSE: tl.constexpr,
        HAS_GK: tl.constexpr,
        HAS_GV: tl.constexpr,
        HAS_S0: tl.constexpr,
        WRITE_FINAL: tl.constexpr,
        WRITE_FINAL_PRE: tl.constexpr,
        C: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """k [B, T, H, K], v [B, T, H, V] in token order; gk [B, T, H, K|1], gv [B, T, H, V|1] log-gates
        (strides given); s0, final, final_pre [B, H, K, V] float32; h [B, NC, H, K, V] (the state at each
        chunk's start, in k's dtype). Grid: (cdiv(K, BK), cdiv(V, BV), B * H)."""
        i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b, i_h = i_bh // H, i_bh % H
        ck = i_k * BK + tl.arange(0, BK)  # (BK,) key columns of this program
        cv = i_v * BV + tl.arange(0, BV)  # (BV,) value columns
        mk, mv = ck < K, cv < V
        mkv = mk[:, None] & mv[None, :]
        rows = tl.arange(0, C)  # (C,) the steps of a chunk
        dt = k.dtype.element_ty
        base_k = (i_b.to(tl.int64) * T * H + i_h) * K  # (b, t=0, h, 0) of a [B, T, H, K] tensor
        base_v = (i_b.to(tl.int64) * T * H + i_h) * V
        base_gk = i_b.to(tl.int64) * gk_sb + i_h * gk_sh
        base_gv = i_b.to(tl.int64) * gv_sb + i_h * gv_sh
        state_offsets = i_bh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]  # into [B, H, K, V]
        n_chunks = tl.cdiv(T, C)

        S = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV) the state at the chunk's start
        if HAS_S0:
            S = tl.load(s0 + state_offsets, mask=mkv, other=0.0)
        for n in range(0, n_chunks):
            chunk_offsets = ((i_b.to(tl.int64) * n_chunks + n) * H + i_h) * K * V
            tl.store(h + chunk_offsets + ck[:, None] * V + cv[None, :], S.to(h.dtype.element_ty), mask=mkv)
            steps = n * C + rows  # (C,)
            ok = steps < T
            if REVERSE:
                tok = T - 1 - steps
            else:
                tok = steps
            # The very last step's write is left out, and added after the loop: P at the last step (the
            # state before its write) must not come from a difference.
            write = steps < T - 1
            k_c = tl.load(
                k + base_k + tok[:, None] * (H * K) + ck[None, :],
                mask=write[:, None] & mk[None, :],
                other=0.0,
            ).to(tl.float32)  # (C, BK)
            v_c = tl.load(
                v + base_v + tok[:, None] * (H * V) + cv[None, :], mask=ok[:, None] & mv[None, :], other=0.0
            ).to(tl.float32)  # (C, BV)
            not_last = (rows < C - 1)[:, None]  # (C, 1): a later step of the same chunk exists
            if HAS_GK:  # decay of each write to the chunk's end: the gates of the steps after it
                g = _step_gates(gk, base_gk, steps, T, ck, mk, gk_st, gk_sd, REVERSE)  # (C, BK)
                g_after = tl.where(
                    not_last, _step_gates(gk, base_gk, steps + 1, T, ck, mk, gk_st, gk_sd, REVERSE), 0.0
                )
                k_c = k_c * tl.exp(tl.cumsum(g_after, axis=0, reverse=True))
                S = S * tl.exp(tl.sum(g, axis=0))[:, None]
            if HAS_GV:
                g = _step_gates(gv, base_gv, steps, T, cv, mv, gv_st, gv_sd, REVERSE)  # (C, BV)
                g_after = tl.where(
                    not_last, _step_gates(gv, base_gv, steps + 1, T, cv, mv, gv_st, gv_sd, REVERSE), 0.0
                )
                v_c = v_c * tl.exp(tl.cumsum(g_after, axis=0, reverse=True))
                S = S * tl.exp(tl.sum(g, axis=0))[None, :]
            S += tl.dot(tl.trans(k_c.to(dt)), v_c.to(dt), input_precision=PRECISION)  # (BK, BV)

        if WRITE_FINAL_PRE:
            tl.store(final_pre + state_offsets, S, mask=mkv)
        if WRITE_FINAL:
            if REVERSE:
                tok_last = 0
            else:
                tok_last = T - 1
            k_last = tl.load(k + base_k + tok_last * (H * K) + ck, mask=mk, other=0.0).to(tl.float32)
            v_last = tl.load(v + base_v + tok_last * (H * V) + cv, mask=mv, other=0.0).to(tl.float32)
            tl.store(final + state_offsets, S + k_last[:, None] * v_last[None, :], mask=mkv)

    @triton.jit(do_not_specialize=["T"])
    def _chunk_output_kernel(
        q,
        k,
        v,
        gk,
        gv,
        h,
        x1,
        x2,
        out,
        out_pre,
        gate_grad,
        totals,
        T,
        H,
        K,
        V,
        gk_sb,
        gk_st,
        gk_sh,
        gk_sd,
        gv_sb,
        gv_st,
        gv_sh,
        gv_sd,
        REVERSE: tl.constexpr,
        HAS_GK: tl.constexpr,
        HAS_GV: tl.constexpr,
        WRITE_OUT: tl.constexpr,
        WRITE_PRE: tl.constexpr,
        GATE_GRAD: tl.constexpr,
        C: tl.constexpr,
        SUB: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """q, k [B, T, H, K]; v, x1, x2, out, out_pre, gate_grad [B, T, H, V] in token order; log-gates
        as in `_chunk_states_kernel`; h [B, NC, H, K, V]; totals [B, NC, H, V] float32 (each chunk's sum
        of the gate-gradient terms). Grid: (cdiv(V, BV), NC, B * H)."""
        i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b, i_h = i_bh // H, i_bh % H
        ck = tl.arange(0, BK)  # (BK,) every key column
        cv = i_v * BV + tl.arange(0, BV)  # (BV,) this program's value columns
        mk, mv = ck < K, cv < V
        rows = tl.arange(0, SUB)  # (SUB,) the steps of a sub-chunk
        dt = q.dtype.element_ty
        base_k = (i_b.to(tl.int64) * T * H + i_h) * K
        base_v = (i_b.to(tl.int64) * T * H + i_h) * V
        base_gk = i_b.to(tl.int64) * gk_sb + i_h * gk_sh
        base_gv = i_b.to(tl.int64) * gv_sb + i_h * gv_sh
        n_chunks = tl.cdiv(T, C)
        chunk_offsets = ((i_b.to(tl.int64) * n_chunks + i_n) * H + i_h) * K * V
        S = tl.load(
            h + chunk_offsets + ck[:, None] * V + cv[None, :], mask=mk[:, None] & mv[None, :], other=0.0
        ).to(tl.float32)  # (BK, BV) the state at the sub-chunk's start
        r = tl.zeros([BV], dtype=tl.float32)  # the chunk's running sum of gate-gradient terms

        for J in tl.static_range(C // SUB):
            steps = i_n * C + J * SUB + rows  # (SUB,)
            ok = steps < T
            if REVERSE:
                tok = T - 1 - steps
            else:
                tok = steps
            off_k = base_k + tok[:, None] * (H * K) + ck[None, :]  # (SUB, BK)
            off_v = base_v + tok[:, None] * (H * V) + cv[None, :]  # (SUB, BV): also the outputs'
            m_k = ok[:, None] & mk[None, :]
            m_v = ok[:, None] & mv[None, :]
            q_J = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32)  # (SUB, BK)
            k_J = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
            v_J = tl.load(v + off_v, mask=m_v, other=0.0).to(tl.float32)  # (SUB, BV)

            # The state at the sub-chunk's start, decayed to each query: prefix sums of its gates.
            q_read = q_J
            if HAS_GK:
                gk_J = _step_gates(gk, base_gk, steps, T, ck, mk, gk_st, gk_sd, REVERSE)  # (SUB, BK)
                q_read = q_J * tl.exp(tl.cumsum(gk_J, axis=0))
            o_state = tl.dot(q_read.to(dt), S.to(dt), input_precision=PRECISION)  # (SUB, BV)
            if HAS_GV:
                gv_J = _step_gates(gv, base_gv, steps, T, cv, mv, gv_st, gv_sd, REVERSE)  # (SUB, BV)
                o_state = o_state * tl.exp(tl.cumsum(gv_J, axis=0))

            # The sub-chunk's own keys s < t, one key at a time from the last: the exponents of
            # query t for key s are the sums of the gates of steps s+1 .. t (E: key side, F: value side),
            # which grow by one gate row per key.
            o_diag = tl.zeros([SUB, BV], dtype=tl.float32)
            E = tl.zeros([SUB, BK], dtype=tl.float32)
            F = tl.zeros([SUB, BV], dtype=tl.float32)
            # Row pointers for the last key, moved one token per key. The gate of step s + 1 is token
            # s + 1's, or reversed, token T - 1 - s's: the key's own token.
            step0 = i_n * C + J * SUB
            if REVERSE:
                tok_last = T - step0 - SUB
                row_k, row_v, row_gk, row_gv = H * K, H * V, gk_st, gv_st
                p_gk = gk + base_gk + tok_last * gk_st + ck * gk_sd
                p_gv = gv + base_gv + tok_last * gv_st + cv * gv_sd
            else:
                tok_last = step0 + SUB - 1
                row_k, row_v, row_gk, row_gv = -H * K, -H * V, -gk_st, -gv_st
                p_gk = gk + base_gk + (tok_last + 1) * gk_st + ck * gk_sd
                p_gv = gv + base_gv + (tok_last + 1) * gv_st + cv * gv_sd
            p_k = k + base_k + tok_last * (H * K) + ck
            p_v = v + base_v + tok_last * (H * V) + cv
            valid_k = ck * 0 + (T - step0)  # (BK,): rows j < T - step0 are steps before T
            valid_v = cv * 0 + (T - step0)  # (BV,)
            below = rows[:, None]  # (SUB, 1)
            for i in range(0, SUB):
                j = SUB - 1 - i  # the key's row in the sub-chunk
                k_s = tl.load(p_k, mask=mk & (valid_k > j), other=0.0).to(tl.float32)  # (BK,)
                v_s = tl.load(p_v, mask=mv & (valid_v > j), other=0.0).to(tl.float32)  # (BV,)
                after = below > j  # (SUB, 1) queries after the key
                if HAS_GK:  # + the gate of step s + 1 for the queries after it (0 beyond T)
                    g = tl.load(p_gk, mask=mk & (valid_k > j + 1), other=0.0).to(tl.float32)
                    E += tl.where(after, tl.maximum(g, -128.0)[None, :], 0.0)  # LOG_GATE_FLOOR
                    key_decay = tl.exp(tl.where(after, E, float("-inf")))  # (SUB, BK)
                    p_gk += row_gk
                else:
                    key_decay = tl.where(after, 1.0, 0.0)
                scores = tl.sum(q_J * k_s[None, :] * key_decay, axis=1)  # (SUB,) q_t . k_s, decayed
                if HAS_GV:
                    g = tl.load(p_gv, mask=mv & (valid_v > j + 1), other=0.0).to(tl.float32)
                    F += tl.where(after, tl.maximum(g, -128.0)[None, :], 0.0)
                    value_decay = tl.exp(tl.where(after, F, float("-inf")))  # (SUB, BV)
                    p_gv += row_gv
                else:
                    value_decay = tl.where(after, 1.0, 0.0)
                o_diag += scores[:, None] * v_s[None, :] * value_decay
                p_k += row_k
                p_v += row_v
            own = tl.sum(q_J * k_J, axis=1)[:, None] * v_J  # (SUB, BV) the token's own write

            if REVERSE:  # the initial state counts as written at the first step: not in out_pre there
                pre = tl.where((steps > 0)[:, None], o_state, 0.0) + o_diag
            else:
                pre = o_state + o_diag
            if WRITE_OUT:
                tl.store(out + off_v, (o_state + o_diag + own).to(out.dtype.element_ty), mask=m_v)
            if WRITE_PRE:
                tl.store(out_pre + off_v, pre, mask=m_v)
            if GATE_GRAD:  # gate_grad_t = the chunk's running sum of x1 * v - x2 * out_pre up to t
                x1_J = tl.load(x1 + off_v, mask=m_v, other=0.0).to(tl.float32)
                x2_J = tl.load(x2 + off_v, mask=m_v, other=0.0).to(tl.float32)
                terms = x1_J * v_J - x2_J * pre  # (SUB, BV), 0 beyond T
                tl.store(gate_grad + off_v, tl.cumsum(terms, axis=0) + r[None, :], mask=m_v)
                r += tl.sum(terms, axis=0)

            if J < C // SUB - 1:  # the state to the next sub-chunk
                not_last = (rows < SUB - 1)[:, None]
                k_write = k_J
                v_write = v_J
                if HAS_GK:
                    g_after = tl.where(
                        not_last, _step_gates(gk, base_gk, steps + 1, T, ck, mk, gk_st, gk_sd, REVERSE), 0.0
                    )
                    k_write = k_J * tl.exp(tl.cumsum(g_after, axis=0, reverse=True))
                    S = S * tl.exp(tl.sum(gk_J, axis=0))[:, None]
                if HAS_GV:
                    g_after = tl.where(
                        not_last, _step_gates(gv, base_gv, steps + 1, T, cv, mv, gv_st, gv_sd, REVERSE), 0.0
                    )
                    v_write = v_J * tl.exp(tl.cumsum(g_after, axis=0, reverse=True))
                    S = S * tl.exp(tl.sum(gv_J, axis=0))[None, :]
                S += tl.dot(tl.trans(k_write.to(dt)), v_write.to(dt), input_precision=PRECISION)

        if GATE_GRAD:
            tl.store(totals + ((i_b.to(tl.int64) * n_chunks + i_n) * H + i_h) * V + cv, r, mask=mv)

    @triton.jit(do_not_specialize=["T"])
    def _gate_grad_prefix_kernel(
        gate_grad,
        totals,
        r0,
        T,
        H,
        V,
        REVERSE: tl.constexpr,
        HAS_R0: tl.constexpr,
        C: tl.constexpr,
        BV: tl.constexpr,
    ):
        """gate_grad [B, T, H, V] += r0 + the totals of the chunks before, in scan order.
        Grid: (cdiv(V, BV), B * H)."""
        i_v, i_bh = tl.program_id(0), tl.program_id(1)
        i_b, i_h = i_bh // H, i_bh % H
        cv = i_v * BV + tl.arange(0, BV)
        mv = cv < V
        rows = tl.arange(0, C)
        base_v = (i_b.to(tl.int64) * T * H + i_h) * V
        n_chunks = tl.cdiv(T, C)
        running = tl.zeros([BV], dtype=tl.float32)
        if HAS_R0:
            running = tl.load(r0 + i_bh.to(tl.int64) * V + cv, mask=mv, other=0.0)
        for n in range(0, n_chunks):
            steps = n * C + rows
            if REVERSE:
                tok = T - 1 - steps
            else:
                tok = steps
            offsets = base_v + tok[:, None] * (H * V) + cv[None, :]
            mask = (steps < T)[:, None] & mv[None, :]
            tl.store(
                gate_grad + offsets,
                tl.load(gate_grad + offsets, mask=mask, other=0.0) + running[None, :],
                mask=mask,
            )
            running += tl.load(
                totals + ((i_b.to(tl.int64) * n_chunks + n) * H + i_h) * V + cv, mask=mv, other=0.0
            )

else:
    _chunk_states_kernel = _chunk_output_kernel = _gate_grad_prefix_kernel = None


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tiles(state_size: int, head_size: int, dtype: torch.dtype) -> dict[str, dict]:
    """Tiles, warps and pipelining stages per kernel, fixed per key size `state_size`, value size
    `head_size` (<= 128) and input dtype. The states kernel splits the state into blocks of up to 32 x 32
    (more programs for the kernel that walks T). The output kernel holds every key column and up to 64
    value columns (one program per chunk covers a GPT-2 head, so its key-side work is done once; 32 in
    float32 above K = 64), on 8 warps where its tiles are larger or float32 (4 warps spill there).
    `python -m dfw_kernels aot` reports registers and spills of each choice."""
    BK = max(16, _next_power_of_2(state_size))
    BV = max(16, _next_power_of_2(head_size))
    output_BV = min(32 if dtype == torch.float32 and BK > 64 else 64, BV)
    wide = BK * output_BV > 64 * 64 or dtype == torch.float32
    return {
        "states": {"BK": min(32, BK), "BV": min(32, BV), "num_warps": 4, "num_stages": 2},
        "output": {"BK": BK, "BV": output_BV, "num_warps": 8 if wide else 4, "num_stages": 1},
        "prefix": {"BV": min(64, BV), "num_warps": 4, "num_stages": 1},
    }


def _gate_args(log_gate: Tensor | None, like: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """A log-gate [B, T, H, D|1] (any strides) as the kernels take it: (pointer, strides); a dummy if None."""
    if log_gate is None:
        return like, (0, 0, 0, 0)
    return log_gate, tuple(log_gate.stride())


def triton_scan(
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
    """closed_form.Scan with the Triton kernels: the same arguments and results as `scan_reference`.

    q, k [B, T, H, state_size]; v [B, T, H, head_size]; log-gates full width or [B, T, H, 1], any strides
    (float32); initial_state [B, H, state_size, head_size] or None."""
    B, T, H, state_size = q.shape
    head_size = v.shape[-1]
    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    f32 = torch.float32
    dummy = q.new_empty(0, dtype=f32)
    out = new_output((B, T, H, head_size), out_dtype, q) if out_dtype is not None else dummy
    out_pre = new_output((B, T, H, head_size), f32, q) if output_pre else dummy
    want_final = output_final_state or output_final_pre_state
    final = new_output((B, H, state_size, head_size), f32, q) if want_final else dummy
    final_pre = new_output((B, H, state_size, head_size), f32, q) if output_final_pre_state else dummy
    x1 = x2 = r0 = gate_grad = None
    if gate_grad_inputs is not None:
        x1, x2, r0 = gate_grad_inputs
        x1, x2 = x1.contiguous(), x2.contiguous()
        r0 = None if r0 is None else r0.float().contiguous()
        gate_grad = new_output((B, T, H, head_size), f32, q)
    s0 = None if initial_state is None else initial_state.float().contiguous()
    if T == 0:  # nothing to scan: the state passes through
        final = final_pre = q.new_zeros(B, H, state_size, head_size, dtype=f32) if s0 is None else s0
    else:
        _launch(
            q,
            k,
            v,
            log_key_gate,
            log_value_gate,
            s0,
            x1,
            x2,
            r0,
            out,
            out_pre,
            gate_grad,
            final,
            final_pre,
            reverse=reverse,
            write_out=out_dtype is not None,
            write_pre=output_pre,
            write_final=want_final,
            write_final_pre=output_final_pre_state,
        )
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


def _launch(
    q,
    k,
    v,
    log_key_gate,
    log_value_gate,
    s0,
    x1,
    x2,
    r0,
    out,
    out_pre,
    gate_grad,
    final,
    final_pre,
    *,
    reverse,
    write_out,
    write_pre,
    write_final,
    write_final_pre,
) -> None:
    """The three kernels of one scan (T > 0), writing into the given outputs."""
    B, T, H, state_size = q.shape
    head_size = v.shape[-1]
    n_chunks = triton.cdiv(T, CHUNK)
    tiles = _tiles(state_size, head_size, q.dtype)
    dummy = q.new_empty(0, dtype=torch.float32)
    # The state at every chunk's start, in the input dtype (the output kernel's tl.dot operand).
    h = torch.empty(B, n_chunks, H, state_size, head_size, dtype=q.dtype, device=q.device)
    gk, gk_strides = _gate_args(log_key_gate, dummy)
    gv, gv_strides = _gate_args(log_value_gate, dummy)
    gates = dict(HAS_GK=log_key_gate is not None, HAS_GV=log_value_gate is not None)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    t = tiles["states"]
    grid = (triton.cdiv(state_size, t["BK"]), triton.cdiv(head_size, t["BV"]), B * H)
    _chunk_states_kernel[grid](
        k,
        v,
        gk,
        gv,
        dummy if s0 is None else s0,
        h,
        final,
        final_pre,
        T,
        H,
        state_size,
        head_size,
        *gk_strides,
        *gv_strides,
        REVERSE=reverse,
        HAS_S0=s0 is not None,
        WRITE_FINAL=write_final,
        WRITE_FINAL_PRE=write_final_pre,
        C=CHUNK,
        PRECISION=precision,
        **gates,
        **t,
    )
    t = tiles["output"]
    totals = (
        torch.empty(B, n_chunks, H, head_size, dtype=torch.float32, device=q.device)
        if gate_grad is not None
        else dummy
    )
    grid = (triton.cdiv(head_size, t["BV"]), n_chunks, B * H)
    _chunk_output_kernel[grid](
        q,
        k,
        v,
        gk,
        gv,
        h,
        dummy if x1 is None else x1,
        dummy if x2 is None else x2,
        out,
        out_pre,
        dummy if gate_grad is None else gate_grad,
        totals,
        T,
        H,
        state_size,
        head_size,
        *gk_strides,
        *gv_strides,
        REVERSE=reverse,
        WRITE_OUT=write_out,
        WRITE_PRE=write_pre,
        GATE_GRAD=gate_grad is not None,
        C=CHUNK,
        SUB=SUBCHUNK,
        PRECISION=precision,
        **gates,
        **t,
    )
    if gate_grad is not None:
        t = tiles["prefix"]
        prefix_grid = (triton.cdiv(head_size, t["BV"]), B * H)
        _gate_grad_prefix_kernel[prefix_grid](
            gate_grad,
            totals,
            dummy if r0 is None else r0,
            T,
            H,
            head_size,
            REVERSE=reverse,
            HAS_R0=r0 is not None,
            C=CHUNK,
            **t,
        )


def decay_fast_weights_triton(q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state):
    """The Triton path of `decay_fast_weights` (same arguments and returns; inputs as resolved for it)."""
    state_size, head_size = q.shape[-1], v.shape[-1]
    dtype = input_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # Full width as views (a [B, T, H, 1] gate broadcasts with stride 0: no copy); the kernels raise
    # log-gates to the floor as they read them.
    log_key_gate = full_width(log_key_gate, state_size)  # (B, T, H, state_size)
    log_value_gate = full_width(log_value_gate, head_size)  # (B, T, H, head_size)
    if initial_state is not None:
        initial_state = initial_state.float()
    return ScanDecayFastWeights.apply(
        triton_scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state
    )
