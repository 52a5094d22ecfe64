"""Softmax attention, the baseline: GPT-2's own attention, as an `AttentionCore`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import AttentionCore, State


class SoftmaxAttention(AttentionCore):
    """Causal softmax attention through PyTorch SDPA; its state is the KV cache (k, v), [B, H, T, D] each.

    The scale is GPT-2's (1/sqrt(D), divided by layer_idx + 1 when `scale_attn_by_inverse_layer_idx`),
    so a converted model with this core gives the logits of the unmodified Hugging Face model.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        scaling: float | None = None,
        **options,
    ):
        super().__init__()
        if options:
            # Options of the fast-weight family (state_size, feature_map, ...) left in a softmax config.
            names = ", ".join(f"attention.{name}" for name in sorted(options))
            raise ConfigError(
                f"attention=softmax takes no {names} (softmax keeps a KV cache, not a fixed-size state); "
                "remove it, or pick a recurrent preset such as attention=decay"
            )
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scaling = head_dim**-0.5 if scaling is None else scaling

    def forward(self, q, k, v, x, state: State = None, output_state: bool = False) -> tuple[Tensor, State]:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        T = q.shape[2]
        if state is not None:
            k = torch.cat([state[0], k], dim=2)  # (B, H, T_past + T, D)
            v = torch.cat([state[1], v], dim=2)
        past = k.shape[2] - T
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        else:
            # Query i (absolute position past + i) sees keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        new_state = (k, v) if (output_state or state is not None) else None
        return o.transpose(1, 2), new_state  # (B, T, H, D)

    def recurrent(self, q, k, v, x, state: State = None) -> tuple[Tensor, State]:
        outputs = []
        for t in range(q.shape[1]):
            o, state = self.forward(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], x[:, t : t + 1], state, True)
            outputs.append(o)
        return torch.cat(outputs, dim=1), state

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        # Keys and values of every past token: grows with the context.
        return 2 * batch_size * self.num_heads * seq_len * self.head_dim * dtype.itemsize
