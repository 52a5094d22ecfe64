"""The seam between GPT-2 and an attention variant.

`ConvertedAttention` replaces a Hugging Face `GPT2Attention` module. It keeps the pretrained
projections `c_attn` (x -> q, k, v) and `c_proj` (heads -> x) and the residual dropout, under the
same state-dict keys, and hands the per-head q, k, v to an `AttentionCore`: the part that differs
between softmax attention and its recurrent replacements. A softmax layer is not converted at all
(`dfw.attention.SoftmaxAttention`): it stays transformers' own `GPT2Attention`.

Which form runs is decided here, in one place (`ConvertedAttention.forward`): without a dfw cache, the
core's parallel form over the call's tokens; with one (`dfw.cache.RecurrentCache`), the core's decode
step for a single new token and its parallel form, continued from the cached state, for a prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from .state import RecurrentLayer, State, copy_state_

__all__ = ["AttentionCore", "ConvertedAttention", "State", "real_tokens"]


class AttentionCore(nn.Module):
    """Maps per-head q, k, v to per-head outputs, in a parallel and a recurrent form that agree; owns its
    decode step and the layout of its state (`dfw.attention.state`).

    q, k, v: [B, T, H, D]; x: [B, T, C], the input of the attention block (used by data-dependent gates).
    token_mask: [B, T] bool, True at real tokens, False at padding, or None (every token is real). A pad
    leaves the state exactly as it was, so a left-padded row gives what the same row gives alone; the output
    at a pad is finite but meaningless (nothing reads it).
    """

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
        """Parallel form (training, prompts), from `state` (None: no token seen).

        Returns (o [B, T, H, D], the state after the last token if `output_state`, else None).
        """
        raise NotImplementedError

    def recurrent(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        state: State | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        """Recurrent form: a loop over the tokens, the oracle of the tests. Returns (o, state)."""
        raise NotImplementedError

    def allocate_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        """The state before any token, for `batch_size` rows of activations in `dtype` (the core picks the
        state's own dtype). Its tensors are the ones `step` writes in place for the rest of the sequence."""
        raise NotImplementedError

    def step(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State, token_mask: Tensor | None = None
    ) -> Tensor:
        """One decode token, q, k, v [B, 1, H, D] and x [B, 1, C]: updates `state` in place (fixed addresses,
        no host synchronisation: CUDA-graph safe) and returns o [B, 1, H, D]."""
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
        """Whether the output is `attention_weights(q, k)` applied to v (so transfer.loss=attention_ce
        applies)."""
        return False

    def attention_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The teacher's target of comparison for transfer.loss=attention_ce: the core's own causal attention
        weights [B, H, T, T] from q, k [B, T, H, D], rows summing to 1 (only where
        `has_attention_weights`)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention weights of its own")

    @property
    def output_scale_calibratable(self) -> bool:
        """Whether `scale_output` can rescale each head's output exactly (transfer.calibrate)."""
        return False

    def scale_output(self, factor: Tensor) -> None:
        """The calibration hook (transfer.calibrate): multiply head h's output by `factor[h]` [H] from now on,
        through the core's own parameters (so an export carries it). Only where
        `output_scale_calibratable`."""
        raise NotImplementedError(f"{type(self).__name__} has no output scale to calibrate")

    def calibration_fit(
        self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, o: Tensor, target: Tensor
    ) -> Tensor:
        """transfer.calibrate's fit on one batch, per head [H], which `apply_calibration` then applies: from
        q, k, v [B, T, H, D], x, the core's output o and the softmax output `target` [B, T, H, D]. By default
        the ratio of their RMS per head (the factor `scale_output` makes the two RMS equal with, for an
        output that scales as a whole); only where `output_scale_calibratable`."""
        rms = lambda t: (
            t.to(torch.promote_types(t.dtype, torch.float32)).square().mean(dim=(0, 1, 3)).sqrt()
        )  # (H,)
        return rms(target) / rms(o).clamp_min(1e-12)  # (H,)

    def apply_calibration(self, fit: Tensor) -> None:
        """Apply `calibration_fit`'s result [H]; by default the output is scaled by it (`scale_output`)."""
        self.scale_output(fit)


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
        token_mask = real_tokens(attention_mask, B, T)  # (B, T) or None
        entry = _recurrent_entry(cache, self.layer_idx)
        if self.teacher is not None:
            o = self.teacher(self, q, k, v, hidden_states)
        elif entry is not None:
            o = self._continue(entry, q, k, v, hidden_states, token_mask)
        else:
            # Training and evaluation: the parallel form over this call's tokens. A transformers cache, if one
            # is passed, is not ours and holds none of this layer's past: refused where that would matter.
            if cache is not None and T == 1 and self.layer_idx == 0:
                _refuse_continuation(kwargs.get("position_ids"))
            o, _ = self.core(q, k, v, hidden_states, token_mask=token_mask)
        o = o.reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(o)), None

    def _continue(
        self, entry: RecurrentLayer, q: Tensor, k: Tensor, v: Tensor, x: Tensor, token_mask: Tensor | None
    ) -> Tensor:
        """With a dfw cache: the decode step for one new token, the parallel form continued from the cached
        state for several (a prompt, or a piece of one); either way the state is written in place."""
        B, T = q.shape[:2]
        if entry.state is None or (entry.seen_tokens == 0 and entry.rows != B):
            entry.state = self.core.allocate_state(B, q.device, q.dtype)
        if T == 1:
            o = self.core.step(q, k, v, x, entry.state, token_mask)
        else:
            o, state = self.core(q, k, v, x, entry.state, output_state=True, token_mask=token_mask)
            copy_state_(entry.state, state)
        entry.seen_tokens += T
        return o


def real_tokens(attention_mask: Any, batch_size: int, T: int) -> Tensor | None:
    """Which of the T tokens of this call are real (not padding): [B, T] bool, or None when all are.

    transformers turns the 2D mask into a 4D one [B, 1, T, kv] (bool for SDPA, additive float for eager), or
    drops it when nothing is padded. Causal masks hide a pad as a key, so the last query's row, restricted to
    the T new keys, is the padding of this call, wherever the pads are. A prompt with no pads gives None (one
    host synchronisation per call of several tokens); a single token keeps its mask, without synchronising.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim not in (2, 4):
        raise NotImplementedError(
            f"dfw's converted attention reads padding from a 2D or 4D tensor mask, got "
            f"{type(attention_mask).__name__}; use attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.ndim == 2:
        real = attention_mask[:, -T:].bool()  # (B, T)
    else:
        last_row = attention_mask[:, 0, -1, -T:]  # (B|1, T)
        real = last_row if last_row.dtype == torch.bool else last_row == 0
    real = real.expand(batch_size, T)  # (B, T)
    if T > 1 and bool(real.all()):
        return None
    return real


def _recurrent_entry(cache: Any, layer_idx: int) -> RecurrentLayer | None:
    """This layer's entry in a dfw cache, or None (no cache, or a transformers cache of keys and values)."""
    if not isinstance(cache, Cache) or layer_idx >= len(cache.layers):
        return None
    entry = cache.layers[layer_idx]
    return entry if isinstance(entry, RecurrentLayer) else None


def _refuse_continuation(position_ids: Tensor | None) -> None:
    """A token after position 0 with a cache that is not ours: its past is lost, so the output would be wrong.

    This is what `model.generate(...)` does on a GPT2LMHeadModel converted in place (dfw.surgery) when it is
    not given a `RecurrentCache` (it makes a `DynamicCache`, which converted layers never fill); a
    `DFWForCausalLM` (what exports load as) supplies a RecurrentCache itself. Checked on single-token calls
    only, so the training path (no cache) never pays the host sync.
    """
    if position_ids is not None and int(position_ids.max()) > 0:
        raise RuntimeError(
            "a converted model continued a sequence with a transformers cache, which holds none of its "
            "state; pass cache=dfw.cache.RecurrentCache(model) to generate (or the forward call), load the "
            "model as dfw.hf.DFWForCausalLM (exports load as one; dfw.hf.as_dfw_model converts a model in "
            "memory), whose generate supplies that cache, or pass use_cache=False"
        )
