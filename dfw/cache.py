"""Generation at constant cost per token: a `transformers` Cache that holds each converted layer's state,
and the decode step of a converted model, eager or captured in a CUDA graph.

    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=100)  # a DFWForCausalLM (an export)
    out = model.generate(input_ids, cache=RecurrentCache(model), max_new_tokens=100)  # any converted GPT-2

`DFWForCausalLM.generate` (what exports load as, `dfw.hf`) supplies a `RecurrentCache` itself; a
GPT2LMHeadModel converted in place (`dfw.surgery`) needs one passed. The cache is a plain container:
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

The decode step of a model whose every layer is converted (fixed-size states: static shapes) has a lean
form, `decode_step` (embeddings, blocks and head, without transformers' per-call preamble), which
`DFWForCausalLM.forward` runs for a plain one-token call (`decode_call_unsupported` says when not), and
which `DecodeGraphs` captures in a CUDA graph once per batch size and replays, on a GPU. See
docs/generation.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import Cache, GPT2LMHeadModel
from transformers.cache_utils import DynamicLayer

from .attention.base import ConvertedAttention
from .attention.state import RecurrentLayer, state_tensors

__all__ = [
    "CUDAGraphCapture",
    "DecodeGraphs",
    "GraphCapture",
    "RecurrentCache",
    "RecurrentLayer",
    "cache_bytes",
    "decode",
    "decode_call_unsupported",
    "decode_step",
]

log = logging.getLogger(__name__)


class RecurrentCache(Cache):
    """The generation cache of a converted GPT-2: per block, the converted layer's state (`RecurrentLayer`),
    or transformers' KV cache entry (`DynamicLayer`) for a layer that keeps softmax.

    Args:
        model: the model (its blocks say which layers are converted), or a number of layers (all converted).
        cuda_graph: capture the decode step in a CUDA graph and replay it (`DecodeGraphs`) when the model runs
            on a GPU and every layer is converted; False: always the eager decode step.
    """

    def __init__(self, model: GPT2LMHeadModel | int, cuda_graph: bool = True):
        if isinstance(model, int):
            layers: list[Any] = [RecurrentLayer() for _ in range(model)]
        else:
            layers = [
                RecurrentLayer() if isinstance(block.attn, ConvertedAttention) else DynamicLayer()
                for block in model.transformer.h
            ]
        super().__init__(layers=layers)
        self.graphs: DecodeGraphs | None = DecodeGraphs() if cuda_graph else None

    @property
    def fully_recurrent(self) -> bool:
        """Every layer keeps a fixed-size state (no KV cache that grows): the decode step is static."""
        return all(isinstance(layer, RecurrentLayer) for layer in self.layers)

    def recurrent_layers(self) -> list[RecurrentLayer]:
        """Every layer's entry, of a cache whose every layer is converted (`fully_recurrent`)."""
        layers = [layer for layer in self.layers if isinstance(layer, RecurrentLayer)]
        if len(layers) != len(self.layers):
            raise TypeError("a layer of this cache keeps softmax's KV cache, not a fixed-size state")
        return layers

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


# --- The decode step ---------------------------------------------------------------------------------------

# Inputs of GPT2LMHeadModel.forward the lean decode step ignores, and the values for which that is exact.
_IGNORABLE = {
    "use_cache": (True, None),
    "return_dict": (True, None),
    "output_attentions": (False, None),
    "output_hidden_states": (False, None),
    "logits_to_keep": (0, 1),
}


def decode_call_unsupported(
    model: nn.Module, cache: Any, input_ids: Tensor | None, attention_mask: Tensor | None, **inputs: Any
) -> str | None:
    """Why a forward call is not a plain decode step of a fully converted model (None: it is one).

    A plain decode step: one new token per row, after a prompt, with a RecurrentCache whose every layer is
    converted, in inference (eval mode, no gradients), the new token real in every row, and no other input
    than those `generate` passes. Anything else takes the model's full forward, which handles every case.
    """
    if not isinstance(cache, RecurrentCache):
        return "no RecurrentCache"
    if not cache.fully_recurrent:
        return "a layer keeps softmax attention (its KV cache grows)"
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] != 1:
        return "not one new token per row"
    if cache.get_seq_length() == 0:
        return "no prompt seen yet (the first call allocates the states)"
    if model.training or torch.is_grad_enabled():
        return "training mode or gradients enabled"
    for name, value in inputs.items():
        if value is None or (
            name in _IGNORABLE and not isinstance(value, Tensor) and value in _IGNORABLE[name]
        ):
            continue
        return f"input {name} is given"
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            return "a 4D attention mask"
        if not bool(attention_mask[:, -1].all()):  # one host sync, as generate's own stopping check
            return "the new token is padding in some row"
    return None


def decode_step(
    model: GPT2LMHeadModel, input_ids: Tensor, position_ids: Tensor, cache: RecurrentCache
) -> Tensor:
    """One new token per row through a fully converted GPT2LMHeadModel: logits [B, 1, V].

    What `GPT2LMHeadModel.forward(input_ids, position_ids=..., cache=cache)` computes (tested equal), without
    its per-call preamble: no causal mask is built (a converted layer reads only the new token's own padding,
    which `decode_call_unsupported` checked is none), no output dataclass, no logits slicing. No host sync, so
    `DecodeGraphs` can capture it.
    """
    transformer = model.transformer
    hidden = transformer.drop(transformer.wte(input_ids) + transformer.wpe(position_ids))  # (B, 1, C)
    for block in transformer.h:
        hidden = block(hidden, cache, None, use_cache=True, position_ids=position_ids)  # (B, 1, C)
    return model.lm_head(transformer.ln_f(hidden))  # (B, 1, V)


def decode(
    model: GPT2LMHeadModel, cache: RecurrentCache, input_ids: Tensor, position_ids: Tensor | None
) -> Tensor:
    """The decode step for a call `decode_call_unsupported` accepted: replayed from a CUDA graph when the
    cache has graphs and the device allows (`DecodeGraphs`), else eager. Returns logits [B, 1, V]."""
    B = input_ids.shape[0]
    if position_ids is None:  # as GPT2Model: positions continue from what the cache has seen
        position_ids = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=input_ids.device)
    position_ids = position_ids.expand(B, 1)  # (B, 1)
    if cache.graphs is not None and cache.graphs.available(input_ids.device):
        return cache.graphs.run(model, cache, input_ids, position_ids)
    return decode_step(model, input_ids, position_ids, cache)


class GraphCapture(Protocol):
    """How a decode step is captured and replayed: CUDA graphs (`CUDAGraphCapture`); the tests substitute an
    eager stand-in, so that the bookkeeping around it runs on a CPU."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why steps on `device` cannot be captured, or None."""
        ...

    def capture(self, step: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        """Record `step` (it reads and writes fixed tensors); returns (replay, the tensor a replay writes)."""
        ...


class CUDAGraphCapture:
    """`torch.cuda.CUDAGraph`: warm-up runs on a side stream (lazy initialisation, the allocator), then one
    captured run. All graphs share one memory pool."""

    def __init__(self, warmups: int = 2):
        self.warmups = warmups
        self.pool: Any = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None if device.type == "cuda" else f"the model runs on {device.type}, not CUDA"

    def capture(self, step: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmups):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        return graph.replay, output


@dataclass
class CapturedStep:
    """One batch size's captured decode step: the static inputs it reads and the logits it writes."""

    replay: Callable[[], None]
    input_ids: Tensor  # (B, 1), copied in before each replay
    position_ids: Tensor  # (B, 1)
    logits: Tensor  # (B, 1, V), written by each replay
    addresses: tuple[int, ...]  # every state tensor's address at capture: the graph reads and writes those


class DecodeGraphs:
    """The decode step of a fully converted model, captured once per batch size and replayed (mamba's
    `capture_graph` / `update_graph_cache`, here behind `model.generate`).

    A replay runs only the recorded kernels: the inputs are copied into the step's static buffers, the states
    are read and written where they were at capture (the decode step keeps their addresses; beam search
    reorders them in place), and the Python bookkeeping that the replay skips, each layer's count of seen
    tokens, is done here. A step is captured again when its batch size is new or a state was reallocated
    (`batch_select_indices`); the warm-up and capture runs change the states, which are restored after.
    If capture fails, decoding goes on eagerly, and `fallback_reason` says why.
    """

    def __init__(self, capture: GraphCapture | None = None):
        self.capture: GraphCapture = capture if capture is not None else CUDAGraphCapture()
        self.steps: dict[int, CapturedStep] = {}  # by batch size
        self.captures = 0  # how many steps were captured (a new batch size, or reallocated states)
        self.replays = 0
        self.fallback_reason: str | None = None

    def available(self, device: torch.device) -> bool:
        if self.fallback_reason is None:
            self.fallback_reason = self.capture.unavailable_reason(device)
        return self.fallback_reason is None

    def run(
        self, model: GPT2LMHeadModel, cache: RecurrentCache, input_ids: Tensor, position_ids: Tensor
    ) -> Tensor:
        B = input_ids.shape[0]
        step = self.steps.get(B)
        if step is None or step.addresses != _addresses(cache):
            try:
                step = self.steps[B] = self._capture(model, cache, input_ids, position_ids)
            except Exception as error:  # e.g. an op that cannot be captured: decode eagerly from now on
                self.fallback_reason = (
                    f"capture failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
                )
                log.warning("dfw.cache: CUDA graph %s; decoding eagerly", self.fallback_reason)
                return decode_step(model, input_ids, position_ids, cache)
        step.input_ids.copy_(input_ids)
        step.position_ids.copy_(position_ids)
        layers = cache.recurrent_layers()
        seen = [layer.seen_tokens for layer in layers]
        step.replay()
        for layer, count in zip(layers, seen, strict=True):
            layer.seen_tokens = count + 1  # what each layer's Python would have counted
        self.replays += 1
        return step.logits.clone()  # the next replay overwrites the buffer

    def _capture(
        self, model: GPT2LMHeadModel, cache: RecurrentCache, input_ids: Tensor, position_ids: Tensor
    ) -> CapturedStep:
        static_ids, static_positions = input_ids.clone(), position_ids.clone()  # (B, 1) each
        states, layers = cache.state_tensors(), cache.recurrent_layers()
        saved, seen = [t.clone() for t in states], [layer.seen_tokens for layer in layers]
        try:
            replay, logits = self.capture.capture(
                lambda: decode_step(model, static_ids, static_positions, cache)
            )
        finally:  # the warm-up and captured runs advanced the states: put them back
            for tensor, before in zip(states, saved, strict=True):
                tensor.copy_(before)
            for layer, count in zip(layers, seen, strict=True):
                layer.seen_tokens = count
        self.captures += 1
        return CapturedStep(replay, static_ids, static_positions, logits, _addresses(cache))


def _addresses(cache: RecurrentCache) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in cache.state_tensors())
