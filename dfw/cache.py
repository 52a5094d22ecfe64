"""Generation at constant cost per token: a `transformers` Cache that holds each layer's recurrent state.

    cache = RecurrentCache(model)
    out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=100)

A converted layer (`dfw.attention.ConvertedAttention`) hands its q, k, v to `run_attention_layer`,
which runs the core's parallel form on a prompt (several tokens: the chunkwise op, with the state
left by earlier calls) and its recurrent form on a single new token, and keeps the state it returns.
A core that has a decode step, `core.step(q, k, v, x, state) -> o` updating `state` in place (the
kernel's `dfw_kernels.decay_fast_weights_step`), is decoded with it instead of `core.recurrent`.
For the fast-weight family that state is [B, H, m, D] per layer whatever the context; for softmax
it is the KV cache, which grows (softmax works here too, for comparison, but not with padding).

Padding: left padding (`tokenizer.padding_side = "left"`), as `generate` expects for decoder-only
models. Pad tokens must leave the state as it was; a core's parallel form has no mask, so a padded
prompt is prefilled in groups of rows with the same number of leading pads, each group on its
unpadded tokens only (one core call per distinct prompt length; no padding, one call). The padding is
read from the mask transformers builds from the 2D `attention_mask` (generate's, or one passed to
the forward call), so nothing has to be stashed on the cache first. Positions come from
`position_ids`, which generate derives from the same mask (each row's first real token is position 0);
a manual forward call with padding must pass them too.

Every state tensor has the batch as its first dimension (beam search reorders it). A state that keeps
its shape is updated in place (`copy_`), so its address is fixed and a decode step can be captured in
a CUDA graph (`dfw.bench.decode`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from .attention.base import AttentionCore, State


class RecurrentLayer(CacheLayerMixin):
    """One layer's entry: the core's state for every row and how many positions it has seen (pads included)."""

    is_sliding = False
    supports_early_init = False  # there is no key/value tensor to allocate ahead

    def __init__(self):
        super().__init__()
        self.state: State = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise TypeError("a RecurrentLayer holds a recurrent state, not keys and values")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise TypeError(
            "RecurrentCache is for dfw's converted attention; an unconverted GPT-2 layer tried to store keys "
            "and values in it (use transformers' DynamicCache for a Hugging Face model)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0  # (kv_length, kv_offset), as DynamicLayer

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # no limit from the cache (GPT-2's learned positions are the limit)

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "a recurrent state cannot forget its last tokens; RecurrentCache cannot be cropped"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_tensors(self.state, lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_tensors(self.state, lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = _map_tensors(self.state, lambda s: s[indices])

    def offload(self) -> None:
        self.state = _map_tensors(self.state, lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # offloading is not supported: states are small and stay where they are
        pass

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self.state))


class RecurrentCache(Cache):
    """The recurrent states of a converted GPT-2, one `RecurrentLayer` per block.

    Args:
        model: the converted model (its `config.n_layer` sets the number of layers), or that number.
    """

    def __init__(self, model: PreTrainedModel | int):
        num_layers = model if isinstance(model, int) else model.config.n_layer
        super().__init__(layers=[RecurrentLayer() for _ in range(num_layers)])

    def run_attention_layer(
        self,
        layer_idx: int,
        core: AttentionCore,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        attention_mask: Any,
    ) -> Tensor:
        """Called by ConvertedAttention: q, k, v [B, T, H, D], x [B, T, C] -> o [B, T, H, D]; keeps the state."""
        layer = cast(RecurrentLayer, self.layers[layer_idx])
        T = q.shape[1]
        padding = _left_padding(attention_mask, q.shape[0], T) if T > 1 else None
        if padding is not None:
            o, state = _prefill_left_padded(core, q, k, v, x, layer.state, padding)
        elif T == 1 and isinstance(layer.state, Tensor) and hasattr(core, "step"):
            # decode: one token with the core's step (the kernel's), the state updated in place
            o, state = core.step(q, k, v, x, layer.state), layer.state  # type: ignore[operator]  # (no declared step yet)
        elif T == 1:
            o, state = core.recurrent(q, k, v, x, layer.state)  # decode: one token, PyTorch recurrent form
        else:
            o, state = core(q, k, v, x, layer.state, output_state=True)  # prefill: parallel form
        layer.state = _keep_address(layer.state, state)
        layer.seen_tokens += T
        return o

    def state_bytes(self) -> int:
        """Bytes held by the states of all layers and rows (what generation keeps between tokens)."""
        return sum(cast(RecurrentLayer, layer).state_bytes for layer in self.layers)


def cache_bytes(cache: Cache | None) -> int:
    """Bytes a generation cache holds: a RecurrentCache's states, or a transformers KV cache's keys and values."""
    if cache is None:
        return 0
    if isinstance(cache, RecurrentCache):
        return cache.state_bytes()
    tensors = [
        t
        for layer in getattr(cache, "layers", [])
        for t in (layer.keys, layer.values)
        if isinstance(t, Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def _left_padding(attention_mask: Any, batch_size: int, T: int) -> Tensor | None:
    """Which of the T new tokens are pads, [B, T] bool, or None when there are none.

    transformers turns the 2D mask into a 4D one [B, 1, T, kv] (bool for SDPA, additive float for eager)
    or drops it when nothing is padded; the last query sees every real key before it, so its row,
    restricted to the T new keys, is the padding of this call.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim not in (2, 4):
        raise NotImplementedError(
            f"RecurrentCache reads padding from a 2D or 4D tensor mask, got {type(attention_mask).__name__}; "
            "use attn_implementation='sdpa' or 'eager'"
        )
    last_row = (
        attention_mask[:, -T:] if attention_mask.ndim == 2 else attention_mask[:, 0, -1, -T:]
    )  # (B|1, T)
    real = last_row.bool() if attention_mask.ndim == 2 or last_row.dtype == torch.bool else last_row == 0
    padding = ~real.expand(batch_size, T)  # (B, T)
    if not padding.any():
        return None
    leading = padding.sum(dim=1)  # (B,) pads per row
    if not torch.equal(padding, torch.arange(T, device=padding.device) < leading[:, None]):
        raise ValueError(
            "RecurrentCache supports left padding only (pads before each row's tokens); "
            "set tokenizer.padding_side = 'left'"
        )
    return padding


def _prefill_left_padded(
    core: AttentionCore, q: Tensor, k: Tensor, v: Tensor, x: Tensor, state: State, padding: Tensor
) -> tuple[Tensor, State]:
    """The parallel form on each row's real tokens only, rows grouped by their number of leading pads.

    Pad positions get output 0 (their logits are never used) and leave the state as it was.
    """
    if state is not None and not isinstance(state, Tensor):
        raise NotImplementedError(
            f"{type(core).__name__} keeps a {type(state).__name__} state, not one tensor; it cannot skip pad "
            "tokens (softmax attention has no padded generation here: generate with the Hugging Face model)"
        )
    B, T = padding.shape
    leading = padding.sum(dim=1)  # (B,)
    o = q.new_zeros(q.shape[:3] + (v.shape[-1],))  # (B, T, H, D)
    new_state = state
    for pads in leading.unique().tolist():
        if pads == T:
            continue  # rows that are all padding in this call: nothing to add
        rows = (leading == pads).nonzero().squeeze(1)  # (B_g,)
        row_state = None if state is None else state[rows]
        o_g, state_g = core(
            q[rows, pads:], k[rows, pads:], v[rows, pads:], x[rows, pads:], row_state, output_state=True
        )
        if not isinstance(state_g, Tensor):
            raise NotImplementedError(
                f"{type(core).__name__} keeps a {type(state_g).__name__} state, not one tensor; it cannot skip pad "
                "tokens (softmax attention has no padded generation here: generate with the Hugging Face model)"
            )
        o[rows, pads:] = o_g
        if new_state is None:
            new_state = state_g.new_zeros((B,) + state_g.shape[1:])  # rows not reached yet: the zero state
        elif new_state is state:
            new_state = state.clone()
        new_state[rows] = state_g
    return o, new_state


def _keep_address(old: State, new: State) -> State:
    """Write `new` into `old` when both are tensors of the same shape (fixed addresses for CUDA graphs)."""
    if (
        isinstance(old, Tensor)
        and isinstance(new, Tensor)
        and old.shape == new.shape
        and old.dtype == new.dtype
    ):
        if new is not old:
            old.copy_(new)
        return old
    return new


def _tensors(state: Any) -> list[Tensor]:  # a State, or any nesting of tuples, lists and dicts of tensors
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _tensors(s)]
    if isinstance(state, dict):
        return [t for s in state.values() for t in _tensors(s)]
    return []


def _map_tensors(state: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(_map_tensors(s, fn) for s in state)
    if isinstance(state, dict):
        return {key: _map_tensors(s, fn) for key, s in state.items()}
    return state
