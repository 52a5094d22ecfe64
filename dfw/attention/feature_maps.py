"""Feature maps phi: per-head queries and keys [B, T, H, D] -> features [B, T, H, m].

One phi is shared between queries and keys within a layer, as in the kernel view of attention
(phi(q) . phi(k) approximates or replaces exp(q . k)). Every map is a module built from
(num_heads, head_dim, state_size); `FEATURE_MAPS` is the registry that `attention.feature_map` names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IdentityFeatureMap(nn.Module):
    """phi(x) = x: no parameters; the state size is the head size."""

    def __init__(self, num_heads: int, head_dim: int, state_size: int):
        super().__init__()
        if state_size != head_dim:
            raise ValueError(f"feature_map=identity needs state_size == head size ({head_dim}), got {state_size}")
        self.output_size = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return x


class LinearFeatureMap(nn.Module):
    """phi(x) = W_h x with a learned W_h in R^{m x D} per head (DFW, Mao 2022).

    Initialisation: the identity when m == D, so the converted layer starts from the pretrained
    q . k; otherwise a random semi-orthogonal W_h (orthonormal rows or columns), which keeps
    inner products as well as a map of that size can.
    """

    def __init__(self, num_heads: int, head_dim: int, state_size: int):
        super().__init__()
        self.output_size = state_size
        weight = torch.empty(num_heads, state_size, head_dim)  # (H, m, D)
        for h in range(num_heads):
            if state_size == head_dim:
                nn.init.eye_(weight[h])
            else:
                nn.init.orthogonal_(weight[h])
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bthd,hmd->bthm", x, self.weight.to(x.dtype))  # (B, T, H, m)


FEATURE_MAPS: dict[str, type[nn.Module]] = {
    "identity": IdentityFeatureMap,
    "linear": LinearFeatureMap,
}
