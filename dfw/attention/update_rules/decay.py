"""Decaying fast weights (Mao 2022): data-dependent decay on the key side, the value side, or both.

    S_t = diag(f_t) S_{t-1} diag(z_t) + phi(k_t)^T v_t,   f_t = sigmoid(W_f x_t + b_f) in (0,1)^m,
                                                          z_t = sigmoid(W_z x_t + b_z) in (0,1)^D

`attention.gates` (key | value | both) says which sides decay. The `UpdateRule` forms run it (the CUDA
kernel on GPU when available).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenInputs, UpdateRule, check_choice, gate_logits, zero_weight_gate

GATES = ("key", "value", "both")


def uniform_gate_bias(n: int) -> Tensor:
    """b = logit(u) with u spread evenly over (1/n, 1 - 1/n) across n channels.

    Retention then spans time scales from ~1 token (u = 1/n) to ~n tokens (u = 1 - 1/n).
    """
    u = torch.linspace(1.0 / n, 1.0 - 1.0 / n, n) if n > 1 else torch.full((1,), 0.5)
    return torch.logit(u)


class DecayRule(UpdateRule):
    name = "decay"
    options = {"gates": "both"}  # which side decays: key | value | both

    def __init__(
        self, hidden_size: int, num_heads: int, head_dim: int, state_size: int, options: Mapping[str, Any]
    ):
        super().__init__(hidden_size, num_heads, head_dim, state_size, options)
        self.sides = options.get("gates", "both")
        check_choice("attention.gates", self.sides, GATES)

    def gates(self) -> dict[str, nn.Module]:
        H, m, D = self.num_heads, self.state_size, self.head_dim
        gates: dict[str, nn.Module] = {}
        if self.sides in ("key", "both"):
            gates["key_gate"] = zero_weight_gate(
                self.hidden_size, uniform_gate_bias(m).repeat(H)
            )  # f_t, (C -> H*m)
        if self.sides in ("value", "both"):
            gates["value_gate"] = zero_weight_gate(
                self.hidden_size, uniform_gate_bias(D).repeat(H)
            )  # z_t, (C -> H*D)
        return gates

    def token_inputs(self, gates: Mapping[str, nn.Module], x: Tensor, inputs: TokenInputs) -> TokenInputs:
        log_gate = lambda name: (
            F.logsigmoid(gate_logits(gates[name], x, self.num_heads)) if name in gates else None
        )
        return inputs._replace(
            log_key_gate=log_gate("key_gate"), log_value_gate=log_gate("value_gate")
        )  # (B, T, H, m), (B, T, H, D)

    def extra_repr(self) -> str:
        return f"gates={self.sides}"
