"""Softmax attention, the baseline: GPT-2's own attention, kept as transformers implements it.

`attention=softmax` converts nothing: `dfw.surgery.convert_attention` leaves every `GPT2Attention` in
place when the core it is given is a `SoftmaxAttention`, so a softmax model *is* `GPT2LMHeadModel`, and
trains and evaluates with transformers' own semantics (attention dropout `attn_pdrop` in training mode,
the padding mask, every `attn_implementation`, its KV cache for generation). This class is the config
target that says so, and describes that attention to code that compares cores: its KV cache size
(`state_bytes`) and its math as a parallel form (`forward`, for `dfw.bench attention`; no dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import AttentionCore, State


def kv_cache_bytes(batch_size: int, num_heads: int, head_dim: int, seq_len: int, dtype: torch.dtype) -> int:
    """Keys and values of every past token, one softmax layer: grows with the context."""
    return 2 * batch_size * num_heads * seq_len * head_dim * dtype.itemsize


class SoftmaxAttention(AttentionCore):
    """Causal softmax attention through PyTorch SDPA at GPT-2's scale (1/sqrt(D), divided by layer_idx + 1
    when `scale_attn_by_inverse_layer_idx`). Surgery keeps the pretrained `GPT2Attention` instead of
    building this into a model (see the module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        scaling: float | None = None,
        window: int | None = None,
        **options,
    ):
        super().__init__()
        if window is not None:
            raise ConfigError(
                f"attention.window={window!r} applies to the fast-weight presets: attention=softmax already "
                "attends to every token exactly; remove attention.window, or pick a preset such as "
                "attention=decay"
            )
        if options:
            # Options of the fast-weight family (state_size, feature_map, ...) left in a softmax config.
            names = ", ".join(f"attention.{name}" for name in sorted(options))
            raise ConfigError(
                f"attention=softmax takes no {names} (softmax keeps a KV cache, not a fixed-size state); "
                "remove it, or pick a recurrent preset such as attention=decay"
            )
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scaling = head_dim**-0.5 if scaling is None else scaling

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: State | None = None,
        output_state: bool = False,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, State | None]:
        """o [B, T, H, D]; `state` is the KV cache (k, v), [B, H, T_past, D] each, which this call extends."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        B, _, T, _ = q.shape
        if state is not None:
            k_past, v_past = state
            assert isinstance(k_past, Tensor) and isinstance(v_past, Tensor), "softmax's state is (k, v)"
            k = torch.cat([k_past, k], dim=2)  # (B, H, T_past + T, D)
            v = torch.cat([v_past, v], dim=2)
        past = k.shape[2] - T
        if past == 0 and token_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        else:
            # Query i (absolute position past + i) sees keys 0 .. past + i that are not pads of this call.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, kv)
            if token_mask is not None:
                keys = F.pad(token_mask, (past, 0), value=True)  # (B, kv)
                mask = mask & keys[:, None, None, :]  # (B, 1, T, kv)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        new_state = (k, v) if (output_state or state is not None) else None
        return o.transpose(1, 2), new_state  # (B, T, H, D)

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return kv_cache_bytes(batch_size, self.num_heads, self.head_dim, seq_len, dtype)
