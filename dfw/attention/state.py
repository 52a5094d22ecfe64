"""What an attention core carries between calls (`State`), and the generation-cache entry that holds it.

A state is laid out by its core: one tensor (a fast-weight state [B, H, m, D]) or a tuple of states (a
`NamedTuple` for a state of several parts, such as a fast-weight state beside a ring buffer of the last W
keys and values). Whatever the layout, every tensor in it has the batch as its first dimension, so the
cache reorders, repeats or selects rows (beam search) without knowing what the tensors mean. The core
makes the state (`AttentionCore.allocate_state`: the state before any token) and its forms read and write
it; the decode step writes it in place, so its tensors keep their addresses and a decode step captured in
a CUDA graph keeps reading and writing the live state (`dfw.cache.DecodeGraphs`).

`RecurrentLayer` is one layer's entry in `dfw.cache.RecurrentCache`: that state, and how many positions the
layer has seen. It is a plain container: the converted layer (`dfw.attention.ConvertedAttention`) decides
which form runs and asks its core for the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

# A tensor whose first dimension is the batch, or a tuple (NamedTuple) of states.
State: TypeAlias = "Tensor | tuple[State, ...]"


def state_tensors(state: State | None) -> list[Tensor]:
    """Every tensor of `state`, in a fixed order (depth first)."""
    if state is None:
        return []
    if isinstance(state, Tensor):
        return [state]
    return [tensor for part in state for tensor in state_tensors(part)]


def map_state(state: State, fn: Callable[[Tensor], Tensor]) -> State:
    """A state of the same layout with `fn` applied to every tensor (a NamedTuple stays one)."""
    if isinstance(state, Tensor):
        return fn(state)
    parts = [map_state(part, fn) for part in state]
    return type(state)(*parts) if type(state) is not tuple else tuple(parts)  # NamedTuple or tuple


def copy_state_(target: State, source: State) -> None:
    """Write `source` into `target` in place, tensor by tensor (the layouts must match)."""
    targets, sources = state_tensors(target), state_tensors(source)
    if len(targets) != len(sources) or any(
        t.shape != s.shape for t, s in zip(targets, sources, strict=False)
    ):
        raise ValueError(
            f"a state of shapes {[tuple(s.shape) for s in sources]} cannot be written into one of shapes "
            f"{[tuple(t.shape) for t in targets]}; a cache holds one batch of sequences (start a new cache)"
        )
    for t, s in zip(targets, sources, strict=True):
        if t is not s:
            t.copy_(s)


def state_nbytes(state: State | None) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


class RecurrentLayer(CacheLayerMixin):
    """One converted layer's entry in a `RecurrentCache`: its core's state for every row (allocated by the
    core on the layer's first call) and how many positions it has seen, pads included.

    Row operations (beam search's reorder, `batch_repeat_interleave`, `batch_select_indices`) map over the
    state's tensors, whatever the core's layout; the reorder writes in place (addresses kept), the other two
    change the batch size and so replace the tensors.
    """

    is_sliding = False
    supports_early_init = (
        False  # there is no key/value tensor to allocate ahead: the core allocates its state
    )

    def __init__(self) -> None:
        super().__init__()
        self.state: State | None = None
        self.seen_tokens = 0

    @property
    def rows(self) -> int | None:
        """The batch size of the state, or None before the first call."""
        tensors = state_tensors(self.state)
        return tensors[0].shape[0] if tensors else None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise TypeError("a RecurrentLayer holds a recurrent state, not keys and values")

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        raise TypeError(
            "a RecurrentLayer holds the state of a converted (dfw) attention layer; a softmax GPT-2 layer "
            "tried to store keys and values in it (build the cache from the model, RecurrentCache(model), "
            "so that softmax layers get transformers' KV cache entries)"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0  # (kv_length, kv_offset), as DynamicLayer

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1  # no limit from the cache (GPT-2's learned positions are the limit)

    def reset(self) -> None:
        """No token seen: the state is zeroed in place (its tensors, and graphs captured on them, stay)."""
        for tensor in state_tensors(self.state):
            tensor.zero_()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "a recurrent state cannot forget its last tokens; RecurrentCache cannot be cropped"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for tensor in state_tensors(self.state):
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))  # in place: addresses kept

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = map_state(self.state, lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state = map_state(self.state, lambda s: s[indices])

    def offload(self) -> None:
        if self.state is not None:
            self.state = map_state(self.state, lambda s: s.to("cpu", non_blocking=True))

    def prefetch(self) -> None:  # offloading is not supported: states are small and stay where they are
        pass

    @property
    def state_bytes(self) -> int:
        return state_nbytes(self.state)
