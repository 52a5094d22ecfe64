"""Generation at constant cost per token: a `transformers` Cache that holds each converted layer's state.

    out = model.generate(input_ids, attention_mask=mask, cache=RecurrentCache(model), max_new_tokens=100)

The cache is a plain container:
one entry per block, a `RecurrentLayer` (`dfw.attention.state`) for a converted layer, whose state its
core allocates and lays out, and transformers' `DynamicLayer` (keys and values) for a layer that keeps
softmax. Which form runs is the layer's decision (`dfw.attention.ConvertedAttention`): the core's
parallel form for a prompt, continued from the cached state, and its decode step for one new token,
which updates the state in place, so every state tensor keeps its address for the whole sequence.

Padding: any pattern (`generate` left-pads decoder-only batches). A converted layer reads which tokens
are pads from the mask transformers builds from the 2D `attention_mask`, and its core makes a pad leave
the state as it was, so a padded row generates what it generates alone; softmax layers mask pads as
transformers does. Positions come from `position_ids`, which generate derives from the same mask (each
row's first real token is position 0); a manual forward call with left padding must pass them too.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from .attention.base import ConvertedAttention
from .attention.state import RecurrentLayer, state_tensors

__all__ = ["RecurrentCache", "RecurrentLayer", "cache_bytes"]


class RecurrentCache(Cache):
    """The generation cache of a converted GPT-2: per block, the converted layer's state (`RecurrentLayer`),
    or transformers' KV cache entry (`DynamicLayer`) for a layer that keeps softmax.

    Args:
        model: the model (its blocks say which layers are converted), or a number of layers (all converted).
    """

    def __init__(self, model: nn.Module | int):
        if isinstance(model, int):
            layers: list[Any] = [RecurrentLayer() for _ in range(model)]
        else:
            layers = [
                RecurrentLayer() if isinstance(block.attn, ConvertedAttention) else DynamicLayer()
                for block in model.transformer.h
            ]
        super().__init__(layers=layers)

    @property
    def fully_recurrent(self) -> bool:
        """Every layer keeps a fixed-size state (no KV cache that grows): the decode step is static."""
        return all(isinstance(layer, RecurrentLayer) for layer in self.layers)

    def state_tensors(self) -> list[Tensor]:
        """Every tensor of every converted layer's state (what a captured decode step reads and writes)."""
        return [
            t
            for layer in self.layers
            if isinstance(layer, RecurrentLayer)
            for t in state_tensors(layer.state)
        ]

    def state_bytes(self) -> int:
        """Bytes held by the states (and KV caches) of all layers and rows: what generation keeps."""
        return sum(_layer_bytes(layer) for layer in self.layers)


def _layer_bytes(layer: Any) -> int:
    if isinstance(layer, RecurrentLayer):
        return layer.state_bytes
    tensors = [t for t in (layer.keys, layer.values) if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache: Cache | None) -> int:
    """Bytes a generation cache holds: a RecurrentCache's states, or a KV cache's keys and values."""
    if cache is None:
        return 0
    if isinstance(cache, RecurrentCache):
        return cache.state_bytes()
    return sum(_layer_bytes(layer) for layer in getattr(cache, "layers", []))
