"""RFA's gated update (Peng et al. 2021): one scalar gate per token and head, from the block input.

    S_t = g_t S_{t-1} + (1 - g_t) phi(k_t)^T v_t,   g_t = sigmoid(w_h . x_t + b_h)

The decaying recurrence with a scalar key-side gate log g_t, keys scaled by 1 - g_t: the `UpdateRule`
forms run it (the chunkwise op's scalar-gate path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenInputs, UpdateRule, gate_logits, zero_weight_gate


def head_gate_bias(num_heads: int, shortest: float = 32.0, longest: float = 1024.0) -> Tensor:
    """Scalar gate biases b_h = logit(1 - 1/tau_h), tau_h log-spaced over [shortest, longest] tokens.

    Our choice for RFA's gate (the papers do not state one): every head starts with a long memory,
    close to the ungated update, and the heads span time scales from 32 to 1024 tokens (GPT-2's context).
    """
    tau = (
        torch.logspace(math.log10(shortest), math.log10(longest), num_heads)
        if num_heads > 1
        else torch.tensor([128.0])
    )
    return torch.log(tau - 1.0)  # logit(1 - 1/tau)


class GatedRule(UpdateRule):
    name = "gated"

    def gates(self) -> dict[str, nn.Module]:
        return {
            "head_gate": zero_weight_gate(self.hidden_size, head_gate_bias(self.num_heads))
        }  # g_t, (C -> H)

    def token_inputs(self, gates: Mapping[str, nn.Module], x: Tensor, inputs: TokenInputs) -> TokenInputs:
        logit = gate_logits(gates["head_gate"], x, self.num_heads)  # (B, T, H, 1)
        phi_k = inputs.phi_k * F.logsigmoid(-logit).exp().to(inputs.phi_k.dtype)  # (1 - g_t) phi(k_t)
        return inputs._replace(phi_k=phi_k, log_key_gate=F.logsigmoid(logit))  # log g_t, one scalar per head
