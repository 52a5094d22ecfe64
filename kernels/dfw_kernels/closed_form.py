"""The backward pass without stored states: three scans of one recurrence and closed-form gate gradients.

The CUDA kernel implements one primitive, a *scan* (`scan_reference` below is its specification in
plain PyTorch). The forward pass is one scan; the backward pass is three more, each recomputing its
state on the fly, so no per-step state [B, T, K, V] is ever written to memory:

    dq_t = do_t S_t^T     a forward scan over S^T      (query do, key v, value k, gates swapped)
    dv_t = k_t G_t        a reverse scan over G        (query k, key q, value do)
    dk_t = v_t G_t^T      a reverse scan over G^T      (query v, key do, value q, gates swapped)

where G_t = q_t^T do_t + diag(alpha_{t+1}) G_{t+1} diag(beta_{t+1}) (G_T = q_T^T do_T + dS_T) is the
adjoint of S_t, and dS_0 = diag(alpha_1) G_1 diag(beta_1) is the reverse scan's final state.

Gate gradients (docs/math.md, "Gradients without storing states") are reverse cumulative sums,

    d log alpha_t = sum_{u >= t} (q_u * dq_u - k_u * dk_u)  +  sum_j dS_T[:, j] * S_T[:, j]
    d log beta_t  = sum_{u >= t} (o_u * do_u - v_u * dv_u)  +  sum_i dS_T[i, :] * S_T[i, :]

but evaluated in that form they lose all precision when gates are small: q_t * dq_t and k_t * dk_t
both contain the token's own term q_t[i] k_t[i] (v_t . do_t), of size 1, while their difference is of
the size of alpha_t beta_t (a float64 check with gates near 1 does not show it; with gates ~e-6 the float32
error is ~1e-2). The own terms cancel exactly, so we drop them before subtracting: with
P_t = diag(alpha_t) S_{t-1} diag(beta_t), the state decayed but not yet written,

    dq'_t = do_t P_t^T,   dk'_t = v_t (G_t - q_t^T do_t)^T,   o'_t = q_t P_t,   dv'_t = k_t (G_t - q_t^T do_t)
    d log alpha_t = sum_{u >= t} (q_u * dq'_u - k_u * dk'_u)  +  sum_j dS_T[:, j] * P_T[:, j]
    d log beta_t  = sum_{u >= t} (o'_u * do_u - v_u * dv'_u)  +  sum_i dS_T[i, :] * P_T[i, :]

(dS_T counted as written at the last step, so dk'_T, dv'_T exclude it). Every term is now of the size
of the result. A scan returns both reads: `out` = q_t S_t and `out_pre` = q_t P_t (the read before the
write), and the reverse scans accumulate the sums as they go (their gate-gradient epilogue).

`forward`-and-`backward` live in `ScanDecayFastWeights`, which takes the scan as an argument: the CPU
tests run it with `scan_reference` in float64 against autograd through the loop of reference.py, and the
CUDA path runs the very same code with the kernel's scan, so the orchestration the GPU executes is tested.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .reference import accumulation_dtype


class ScanResult(NamedTuple):
    out: Tensor | None  # [B, T, H, V] q_t S_t in out_dtype (None if out_dtype is None)
    out_pre: Tensor | None  # [B, T, H, V] q_t P_t in the accumulation dtype, if output_pre
    final_state: Tensor | None  # [B, H, K, V] in the accumulation dtype, if output_final_state
    final_pre_state: Tensor | None  # [B, H, K, V] P at the scan's last step, if output_final_pre_state
    gate_grad: Tensor | None  # [B, T, H, V] in the accumulation dtype, if gate_grad_inputs are given


class Scan(Protocol):
    def __call__(
        self,
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
    ) -> ScanResult: ...


def scan_reference(
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
) -> ScanResult:
    """The scan the CUDA kernel computes, as a loop over time: the kernel's specification.

    q, k [B, T, H, K]; v [B, T, H, V]; log-gates [B, T, H, K] / [B, T, H, V] or None (gate 1);
    initial_state [B, H, K, V] or None (zeros). With a = exp(log_key_gate), b = exp(log_value_gate):

    reverse=False: for t = 0 .. T-1:   P = diag(a_t) S diag(b_t);  S = P + k_t^T v_t
    reverse=True:  for t = T-1 .. 0:   P = diag(a_{t+1}) S diag(b_{t+1});  S = P + k_t^T v_t   (a_T = b_T = 1)
                   the initial state counts as written at the first step (P = 0 there), and the final
                   state gets one more decay, diag(a_0) S diag(b_0).
    out_t = q_t S,  out_pre_t = q_t P.  final_pre_state: P at the last step.
    gate_grad_inputs = (x1, x2, r0) with x1, x2 [B, T, H, V], r0 [B, H, V] or None: a running sum
    r = r0 is carried in the scan's order, r += x1_t * v_t - x2_t * out_pre_t, and gate_grad_t = r.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    S = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    a = None if log_key_gate is None else log_key_gate.to(acc).exp()  # (B, T, H, K)
    b = None if log_value_gate is None else log_value_gate.to(acc).exp()  # (B, T, H, V)
    out = q.new_zeros(B, T, H, V, dtype=acc)
    out_pre = torch.zeros_like(out)
    P = S
    gate_grad = None
    if gate_grad_inputs is not None:
        x1, x2, r0 = gate_grad_inputs
        r = q.new_zeros(B, H, V, dtype=acc) if r0 is None else r0.to(acc)
        gate_grad = torch.empty_like(out)
    for step, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        g = t + 1 if reverse else t  # the gate applied before the write at step t
        P = S
        if g < T and a is not None:
            P = P * a[:, g].unsqueeze(-1)  # (B, H, K, 1) broadcast
        if g < T and b is not None:
            P = P * b[:, g].unsqueeze(-2)  # (B, H, 1, V) broadcast
        S = P + k[:, t].to(acc).unsqueeze(-1) * v[:, t].to(acc).unsqueeze(-2)  # (B, H, K, V)
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S)  # (B, H, V)
        if not (reverse and step == 0):
            out_pre[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), P)
        if gate_grad is not None:
            r = r + x1[:, t].to(acc) * v[:, t].to(acc) - x2[:, t].to(acc) * out_pre[:, t]
            gate_grad[:, t] = r
    if reverse and T > 0:
        if a is not None:
            S = S * a[:, 0].unsqueeze(-1)
        if b is not None:
            S = S * b[:, 0].unsqueeze(-2)
    return ScanResult(
        out=None if out_dtype is None else out.to(out_dtype),
        out_pre=out_pre if output_pre else None,
        final_state=S if output_final_state else None,
        final_pre_state=P if output_final_pre_state else None,
        gate_grad=gate_grad,
    )


def _transpose(state: Tensor | None) -> Tensor | None:
    return None if state is None else state.transpose(-1, -2)  # (B, H, V, K)


def _kept(x: Tensor | None) -> Tensor:
    """A tensor the forward kept because this backward needs it."""
    assert x is not None, "the forward did not keep a tensor the backward needs"
    return x


def backward(
    scan: Scan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_key_gate: Tensor | None,
    log_value_gate: Tensor | None,
    initial_state: Tensor | None,
    o_pre: Tensor | None,
    final_pre_state: Tensor | None,
    do: Tensor,
    d_final_state: Tensor | None,
    needs_grad: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """(dq, dk, dv, d log_key_gate, d log_value_gate, d initial_state), each None where not needed.

    o_pre: the forward's out_pre, q_t P_t (needed for d log_value_gate); final_pre_state: the
    forward's P_T (needed for the gate gradients when d_final_state is given).
    """
    need_dq, need_dk, need_dv, need_dgk, need_dgv, need_ds0 = needs_grad
    need_dgk = need_dgk and log_key_gate is not None
    need_dgv = need_dgv and log_value_gate is not None
    need_ds0 = need_ds0 and initial_state is not None
    acc = accumulation_dtype(q.dtype)
    key_start = value_start = None  # where the reverse cumulative sums start: the final-state terms
    if d_final_state is not None:
        d_final_state = d_final_state.to(acc)
        if need_dgk:
            key_start = (d_final_state * _kept(final_pre_state)).sum(-1)  # (B, H, K)
        if need_dgv:
            value_start = (d_final_state * _kept(final_pre_state)).sum(-2)  # (B, H, V)
    dq = dk = dv = dgk = dgv = ds0 = dq_pre = None

    if need_dq or need_dgk:  # dq_t = do_t S_t^T: a forward scan over S^T.
        result = scan(
            do,
            v,
            k,
            log_value_gate,
            log_key_gate,
            _transpose(initial_state),
            out_dtype=q.dtype if need_dq else None,
            output_pre=need_dgk,
        )
        dq, dq_pre = result.out, result.out_pre  # (B, T, H, K)

    if need_dv or need_dgv or need_ds0:  # dv_t = k_t G_t: a reverse scan over G; its final state is dS_0.
        result = scan(
            k,
            q,
            do,
            log_key_gate,
            log_value_gate,
            d_final_state,
            reverse=True,
            out_dtype=v.dtype if need_dv else None,
            output_final_state=need_ds0,
            gate_grad_inputs=(_kept(o_pre), v, value_start) if need_dgv else None,
        )
        dv, dgv, ds0 = result.out, result.gate_grad, result.final_state

    if need_dk or need_dgk:  # dk_t = v_t G_t^T: a reverse scan over G^T.
        result = scan(
            v,
            do,
            q,
            log_value_gate,
            log_key_gate,
            _transpose(d_final_state),
            reverse=True,
            out_dtype=k.dtype if need_dk else None,
            gate_grad_inputs=(_kept(dq_pre), k, key_start) if need_dgk else None,
        )
        dk, dgk = result.out, result.gate_grad
    return dq, dk, dv, dgk, dgv, ds0


class ScanDecayFastWeights(torch.autograd.Function):
    """o, S_T by one scan; the backward by three scans (see the module docstring).

    apply(scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state), with
    full-width log-gates (or None) and the initial state (or None) in the accumulation dtype; a scan that
    broadcasts may take [B, T, H, 1] gates (chunked.py's does): autograd sums their full-width gradient.
    Returns (o [B, T, H, V] in v's dtype, S_T [B, H, K, V] or None).
    """

    @staticmethod
    def forward(ctx, scan, q, k, v, log_key_gate, log_value_gate, initial_state, output_final_state):
        need_dgk = log_key_gate is not None and ctx.needs_input_grad[4]
        need_dgv = log_value_gate is not None and ctx.needs_input_grad[5]
        result = scan(
            q,
            k,
            v,
            log_key_gate,
            log_value_gate,
            initial_state,
            out_dtype=v.dtype,
            output_pre=need_dgv,
            output_final_state=output_final_state,
            output_final_pre_state=output_final_state and (need_dgk or need_dgv),
        )
        ctx.save_for_backward(
            q, k, v, log_key_gate, log_value_gate, initial_state, result.out_pre, result.final_pre_state
        )
        ctx.scan = scan
        ctx.set_materialize_grads(False)
        return result.out, result.final_state

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, log_key_gate, log_value_gate, initial_state, o_pre, final_pre_state = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)  # (B, T, H, V): only the final state was used
        grads = backward(
            ctx.scan,
            q,
            k,
            v,
            log_key_gate,
            log_value_gate,
            initial_state,
            o_pre,
            final_pre_state,
            do.contiguous(),
            d_final_state,
            tuple(ctx.needs_input_grad[1:7]),
        )
        return (None, *grads, None)
