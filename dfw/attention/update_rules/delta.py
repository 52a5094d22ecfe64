"""The delta rule (Schlag et al. 2021): its update rule, in a chunkwise parallel form (WY/UT) and as a loop
over time.

Per head, row-vector convention as in `dfw_kernels` (state S is K x V, K = feature size, V = head size):

    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})        o_t = q_t S_t   (read after write)

beta_t in (0, 1) is a scalar per token and head. With k_t sum-normalised and non-negative,
|k_t| <= 1, so I - beta_t k_t^T k_t is a contraction and the state stays bounded.

Chunkwise form (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule"): inside a
chunk of C tokens with start state S, the rows u_t = beta_t (v_t - k_t S_{t-1}) solve the unit
lower-triangular system (I + tril(diag(beta) K K^T, -1)) u = diag(beta) (V - K S), so with
T = (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta),  W = T K,  U = T V:

    u = U - W S,     O = Q S + (Q K^T * causal) u,     S_next = S + K^T u

W and U depend on the chunk's own tokens only and are computed for all chunks at once; the loop runs
over chunks, never over time steps.

As an update rule, beta_t = sigmoid(w_h . x_t + b_h) per head (`write_strength`), and it needs
sum-normalised features (`DeltaRule.check`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from dfw_kernels.reference import accumulation_dtype
from torch import Tensor, nn

from ...errors import ConfigError
from .base import TokenInputs, UpdateRule, gate_logits, zero_weight_gate


def recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The delta rule as written: a loop over time (generation, and the test oracle).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H, 1] in (0, 1).
        initial_state: [B, H, K, V] or None (zeros).
    Returns:
        (o [B, T, H, V] in v's dtype, final state [B, H, K, V] in float32/float64, or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = accumulation_dtype(q.dtype)
    S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        k_t, v_t = k[:, t].to(dtype), v[:, t].to(dtype)  # (B, H, K), (B, H, V)
        error = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)  # (B, H, V)
        S = S + beta[:, t].to(dtype).unsqueeze(-1) * k_t.unsqueeze(-1) * error.unsqueeze(-2)  # (B, H, K, V)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(dtype), S))  # (B, H, V)
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V, dtype=dtype)  # (B, T, H, V)
    return o.to(v.dtype), (S if output_final_state else None)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunkwise (WY/UT) form; same arguments and results as `recurrent_delta_rule`.

    Computed in float32 (float64 for float64 input) with autocast off: the triangular solve and the
    state products lose too much in bf16.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    dtype = accumulation_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        pad = (-T) % C

        def chunks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, N, C, D]; padding has k = v = beta = 0
            x = F.pad(x.transpose(1, 2).to(dtype), (0, 0, 0, pad))  # (B, H, T + pad, D)
            return x.reshape(B, H, -1, C, x.shape[-1])  # (B, H, N, C, D)

        qc, kc, vc, bc = chunks(q), chunks(k), chunks(v), chunks(beta)  # bc: (B, H, N, C, 1)
        N = qc.shape[2]
        strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        # UT transform, all chunks at once: A = I + tril(diag(beta) K K^T, -1);
        # W = A^-1 diag(beta) K, U = A^-1 diag(beta) V.
        A = (bc * (kc @ kc.transpose(-1, -2))).masked_fill(~strictly_lower, 0.0)  # (B, H, N, C, C)
        A = A + torch.eye(C, dtype=dtype, device=q.device)
        WU = torch.linalg.solve_triangular(
            A, bc * torch.cat([kc, vc], dim=-1), upper=False, unitriangular=True
        )
        W, U = WU.split([K, V], dim=-1)  # (B, H, N, C, K), (B, H, N, C, V)
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C)

        S = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        outputs = []
        for n in range(N):
            u = U[:, :, n] - W[:, :, n] @ S  # (B, H, C, V)
            outputs.append(qc[:, :, n] @ S + scores[:, :, n] @ u)  # (B, H, C, V)
            S = S + kc[:, :, n].transpose(-1, -2) @ u  # (B, H, K, V)
        o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(v.dtype), (S if output_final_state else None)


class DeltaRule(UpdateRule):
    name = "delta"

    @classmethod
    def check(cls, feature_map: str, normalization: str) -> None:
        if normalization != "sum":
            raise ConfigError(
                "attention.update_rule=delta needs attention.normalization=sum (sum-normalised features "
                f"keep the delta rule's state bounded), got {normalization}"
            )

    def gates(self) -> dict[str, nn.Module]:
        # beta_t = sigmoid(0) = 1/2 at conversion: our choice (Schlag et al. do not state one).
        return {
            "write_strength": zero_weight_gate(self.hidden_size, torch.zeros(self.num_heads))
        }  # beta_t, (C -> H)

    def token_inputs(self, gates: Mapping[str, nn.Module], x: Tensor, inputs: TokenInputs) -> TokenInputs:
        beta = torch.sigmoid(gate_logits(gates["write_strength"], x, self.num_heads))  # (B, T, H, 1)
        return inputs._replace(write_strength=beta)

    def parallel(self, inputs, state, output_state, chunk_size, kernel):
        # No CUDA kernel for the delta rule: `kernel` does not apply.
        return chunk_delta_rule(
            inputs.phi_q, inputs.phi_k, inputs.v, inputs.write_strength, state, output_state, chunk_size
        )

    def recurrent(self, inputs, state):
        return recurrent_delta_rule(
            inputs.phi_q, inputs.phi_k, inputs.v, inputs.write_strength, state, output_final_state=True
        )

    def step(self, inputs, state, kernel):
        o, new_state = self.recurrent(inputs, state)
        state.copy_(new_state)
        return o
