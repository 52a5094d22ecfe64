"""The seam between GPT-2 and an attention variant.

`ConvertedAttention` replaces a Hugging Face `GPT2Attention` module. It keeps the pretrained
projections `c_attn` (x -> q, k, v) and `c_proj` (heads -> x) and the residual dropout, under the
same state-dict keys, and hands the per-head q, k, v to an `AttentionCore`: the part that differs
between softmax attention and its recurrent replacements.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

# What a core carries between calls (None before the first): a fixed-size fast-weight state, one tensor
# [B, H, m, D] ([B, H, m, D + 1] with a denominator column), or softmax's KV cache (k, v), [B, H, T, D] each.
State: TypeAlias = "Tensor | tuple[Tensor, Tensor] | None"


class AttentionCore(nn.Module):
    """Maps per-head q, k, v to per-head outputs, in a parallel and a recurrent form that agree.

    q, k: [B, T, H, D]; v: [B, T, H, D]; x: [B, T, C], the input of the attention block (used by
    data-dependent gates). Both forms take the state left by an earlier call and return the new one.
    """

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State = None, output_state: bool = False
    ) -> tuple[Tensor, State]:
        """Parallel form (training, prompt prefill). Returns (o [B, T, H, D], state or None)."""
        raise NotImplementedError

    def recurrent(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        """Recurrent form (generation): consumes tokens one at a time. Returns (o, state)."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state this core keeps for `batch_size` sequences after `seq_len` tokens."""
        raise NotImplementedError

    # -- What attention transfer (dfw.transfer) asks of a core ------------------------------------------
    def transfer_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters attention transfer trains: the core's own (those conversion added)."""
        return self.parameters()

    @property
    def has_attention_weights(self) -> bool:
        """Whether the output is `attention_weights(q, k)` applied to v (so transfer.loss=attention_ce applies)."""
        return False

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The teacher's target of comparison for transfer.loss=attention_ce: the core's own causal attention
        weights [B, H, T, T] from q, k [B, T, H, D], rows summing to 1 (only where `has_attention_weights`)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention weights of its own")

    @property
    def output_scale_calibratable(self) -> bool:
        """Whether `scale_output` can rescale each head's output exactly (transfer.calibrate)."""
        return False

    def scale_output(self, factor: Tensor) -> None:
        """The calibration hook (transfer.calibrate): multiply head h's output by `factor[h]` [H] from now on,
        through the core's own parameters (so an export carries it). Only where `output_scale_calibratable`."""
        raise NotImplementedError(f"{type(self).__name__} has no output scale to calibrate")


class ConvertedAttention(nn.Module):
    """Drop-in replacement for `GPT2Attention` (self-attention only) around an `AttentionCore`."""

    def __init__(self, original: GPT2Attention, core: AttentionCore):
        super().__init__()
        if getattr(original, "is_cross_attention", False):
            raise ValueError("ConvertedAttention replaces self-attention only, not cross-attention")
        self.c_attn = original.c_attn  # pretrained, (C -> 3C)
        self.c_proj = original.c_proj  # pretrained, (C -> C)
        self.resid_dropout = original.resid_dropout
        self.layer_idx = original.layer_idx
        self.num_heads = original.num_heads
        self.head_dim = original.head_dim
        self.embed_dim = original.embed_dim
        self.scaling = original.scaling  # softmax's score scale, for the teacher of attention transfer
        self.core = core
        # Attention transfer (dfw.transfer) sets a callable here: it computes the pretrained softmax
        # output from the same q, k, v (which flows on), and the core's loss against it.
        self.teacher = None

    def forward(
        self,
        hidden_states: Tensor,
        cache: Any = None,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        # transformers renamed `past_key_values` to `cache` in 5.x; accept either.
        cache = cache if cache is not None else past_key_values
        B, T, C = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim) for t in (q, k, v))  # (B, T, H, D)
        run_layer = getattr(cache, "run_attention_layer", None)
        if run_layer is None:
            # Training and plain evaluation (a Hugging Face cache, if one is passed, is not ours: ignored).
            if cache is not None and T == 1 and self.layer_idx == 0:
                _refuse_continuation(kwargs.get("position_ids"))
            if self.teacher is not None:
                o = self.teacher(self, q, k, v, hidden_states)
            else:
                o, _ = self.core(q, k, v, hidden_states)
        else:
            # A dfw cache (`dfw.cache.RecurrentCache`): it holds this layer's state and runs the parallel
            # form on a prompt, the recurrent form on one new token.
            o = run_layer(self.layer_idx, self.core, q, k, v, hidden_states, attention_mask)
        o = o.reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(o)), None


def _refuse_continuation(position_ids: Tensor | None) -> None:
    """A token after position 0 with a cache that is not ours: its past is lost, so the output would be wrong.

    This is what `model.generate(...)` does when it is not given a `RecurrentCache` (it makes a
    `DynamicCache`, which converted layers never fill). Checked on single-token calls only, so the
    training path (no cache) never pays the host sync.
    """
    if position_ids is not None and int(position_ids.max()) > 0:
        raise RuntimeError(
            "a converted model continued a sequence with a transformers cache, which holds none of its state; "
            "pass cache=dfw.cache.RecurrentCache(model) to generate (or the forward call), or use_cache=False"
        )
