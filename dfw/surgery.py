"""Model surgery: replace the attention core of every GPT-2 layer, keeping every pretrained weight.

What is kept: every parameter of the Hugging Face model, under its original key; the attention
projections `c_attn` and `c_proj` move into `ConvertedAttention` unchanged
(`transformer.h.<i>.attn.c_attn.weight` stays the key it was). What is new: the parameters of each
layer's core, under `transformer.h.<i>.attn.core.*`, initialised by the core itself (see
`dfw.attention`: feature maps at the identity, decay gates with zero weights and uniform biases).
A layer whose core is softmax (`dfw.attention.SoftmaxAttention`) is not converted: it keeps
transformers' `GPT2Attention`, so `attention=softmax` is GPT-2 exactly.

Hybrids: `attention.softmax_layers` keeps softmax (the pretrained `GPT2Attention`, untouched) in the layers
it names and converts the others (`softmax_layers`, `convert_attention`; docs/hybrids.md). It is an option
of the conversion, not of a core: read here, never passed to a core's constructor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .attention import AttentionCore, ConvertedAttention, SoftmaxAttention
from .attention.softmax import kv_cache_bytes
from .errors import ConfigError, instantiate
from .safe_config import build_checked, check_options, plain

log = logging.getLogger(__name__)

# Builds one layer's core: called with hidden_size, num_heads, head_dim, layer_idx, scaling.
CoreFactory = Callable[..., AttentionCore]

# The key of an attention node that says which layers keep softmax (null: none, every layer converted).
SOFTMAX_LAYERS = "softmax_layers"
_SOFTMAX_LAYERS_FORMS = "null, a list of layer indices such as [0, 5], or {every_k: K}"


def softmax_layers(
    attention: DictConfig | Mapping[str, Any], n_layer: int | None, source: str | None = None
) -> tuple[int, ...]:
    """The layers that `attention.softmax_layers` keeps softmax in, sorted (empty: every layer converted).

    The option's forms:
        null             every layer converted (the default)
        [0, 5]           these layers (0-based, each at most once, in range)
        {every_k: K}     every K-th layer: K - 1, 2K - 1, ... (K = 4 on 12 layers: 3, 7, 11)
    It keeps at least one layer converted (softmax everywhere is attention=softmax) and only applies to a
    converted preset (attention=softmax keeps softmax in every layer already). `n_layer`: the model's number
    of layers, None where it is not known yet (the form is checked, the range is not). A ConfigError names
    the option (with `source`, the file a stored config was read from) and says what to do.
    """
    node = OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else attention
    spec = node.get(SOFTMAX_LAYERS) if isinstance(node, Mapping) else None
    if spec is None:
        return ()
    where = f"{source}: " if source else ""
    option = f"attention.{SOFTMAX_LAYERS}={_show(spec)}"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{where}{option}: {problem}")

    if node.get("name") == "softmax" or str(node.get("_target_", "")).endswith("SoftmaxAttention"):
        raise fail(
            "attention=softmax keeps softmax in every layer already; leave softmax_layers null, or keep it "
            "in some layers of a converted preset (attention=decay attention.softmax_layers=[0])"
        )
    if isinstance(spec, Mapping):
        k = spec.get("every_k")
        if set(spec) != {"every_k"} or not _is_int(k):
            raise fail(f"expected {_SOFTMAX_LAYERS_FORMS}")
        if k <= 0:
            raise fail("every_k must be a positive integer (every_k: 4 keeps layers 3, 7, ...)")
        layers = tuple(range(k - 1, n_layer, k)) if n_layer is not None else ()
        if n_layer is not None and not layers:
            raise fail(f"every_k={k} selects none of the model's {n_layer} layers; use every_k <= {n_layer}")
    elif isinstance(spec, list | tuple):
        if not spec:
            raise fail("an empty list keeps no layer; use null (every layer converted)")
        if not all(_is_int(i) for i in spec):
            raise fail(f"layer indices are integers, 0-based; expected {_SOFTMAX_LAYERS_FORMS}")
        negative = [i for i in spec if i < 0]
        if negative:
            raise fail(f"layer {negative[0]} is negative; layers are counted from 0")
        repeated = sorted({i for i in spec if spec.count(i) > 1})
        if repeated:
            raise fail(f"layer {repeated[0]} is named twice; name each layer once")
        if n_layer is not None and max(spec) >= n_layer:
            raise fail(
                f"layer {max(spec)} is out of range: the model has {n_layer} layers (0 to {n_layer - 1})"
            )
        layers = tuple(sorted(spec))
    else:
        raise fail(f"expected {_SOFTMAX_LAYERS_FORMS}")
    if n_layer is not None and len(layers) == n_layer:
        raise fail(f"keeps softmax in all {n_layer} layers, which is attention=softmax; convert at least one")
    return layers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def core_factory(attention: DictConfig | dict, source: str | None = None) -> CoreFactory:
    """The `conf/attention/*.yaml` node -> a callable that builds one layer's core.

    `source`: the file the node was read from (an export, a checkpoint). Such a node is checked
    against dfw's own attention classes and options and built without Hydra (`dfw.safe_config`).
    A node of the run's own config is built by Hydra; an option its class does not take is one
    ConfigError naming it.
    `attention.softmax_layers` is not a core's option: it is left out here (see `softmax_layers`).
    """
    if source is not None:
        stored = plain(attention)
        if isinstance(stored, Mapping):
            stored = {k: v for k, v in stored.items() if k != SOFTMAX_LAYERS}
        return build_checked(stored, AttentionCore, source, "attention")
    node = (
        OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
    )
    node.pop("name", None)
    node.pop(SOFTMAX_LAYERS, None)
    if isinstance(node.get("_target_"), str):
        try:
            target = get_object(node["_target_"])
        except Exception:  # Hydra's instantiate below reports a target it cannot find
            target = None
        if callable(target):
            check_options(target, node, "attention")
    return instantiate(node)


@dataclass
class ParameterCounts:
    pretrained: int  # parameters the model had before conversion (kept)
    new: int  # parameters the attention cores added
    trainable: int  # parameters with requires_grad after conversion

    def __str__(self) -> str:
        return f"{self.pretrained:,} pretrained, {self.new:,} new, {self.trainable:,} trainable parameters"


def convert_attention(
    model: nn.Module, core_factory: CoreFactory, keep_softmax: tuple[int, ...] = ()
) -> ParameterCounts:
    """Replace `model.transformer.h[i].attn` (GPT2Attention) by ConvertedAttention(core) in place; a layer
    whose core is softmax, and every layer in `keep_softmax` (what `softmax_layers` read from the attention
    node), keeps its GPT2Attention (transformers' own attention, dropout and KV cache): no core is built
    for it."""
    blocks = model.transformer.h
    if any(i < 0 or i >= len(blocks) for i in keep_softmax) or len(set(keep_softmax)) != len(keep_softmax):
        raise ValueError(f"keep_softmax={keep_softmax}: distinct layer indices of 0 to {len(blocks) - 1}")
    before = {id(p): p.numel() for p in model.parameters()}
    for i, block in enumerate(blocks):
        original = block.attn
        if isinstance(original, ConvertedAttention):
            raise ValueError(f"layer {i} is already converted; convert a model once")
        if i in keep_softmax:
            continue  # attention.softmax_layers: the pretrained attention stays
        c_attn_shape = tuple(original.c_attn.weight.shape)
        core = core_factory(
            hidden_size=original.embed_dim,
            num_heads=original.num_heads,
            head_dim=original.head_dim,
            layer_idx=i,
            scaling=original.scaling,
        )
        if isinstance(core, SoftmaxAttention):
            continue  # softmax is the pretrained attention: nothing to convert
        block.attn = ConvertedAttention(original, core)
        assert (
            tuple(block.attn.c_attn.weight.shape)
            == c_attn_shape
            == (original.embed_dim, 3 * original.embed_dim)
        )
    counts = ParameterCounts(
        pretrained=sum(before.values()),
        new=sum(p.numel() for p in model.parameters() if id(p) not in before),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    converted = [block.attn.core for block in blocks if isinstance(block.attn, ConvertedAttention)]
    kinds = ", ".join(sorted({type(core).__name__ for core in converted})) or "none (softmax kept)"
    layers = f"layer{'s' if len(keep_softmax) > 1 else ''} {', '.join(map(str, keep_softmax))}"
    kept = f" (softmax kept in {layers})" if keep_softmax else ""
    log.info("converted %d of %d layers to %s%s: %s", len(converted), len(blocks), kinds, kept, counts)
    return counts


def convert_to(model: nn.Module, attention: DictConfig | dict, source: str | None = None) -> ParameterCounts:
    """Convert `model` in place as the `conf/attention/*.yaml` node says: every layer's core built from the
    node (`core_factory`), softmax kept in the layers `attention.softmax_layers` names (`softmax_layers`).
    `source`: the file a stored node was read from (an export, a checkpoint), as for `core_factory`."""
    keep = softmax_layers(attention, len(model.transformer.h), source)
    return convert_attention(model, core_factory(attention, source=source), keep)


def model_size_metrics(net: nn.Module, block_size: int) -> dict[str, float]:
    """What dfw.train logs for dfw.report about a converted model.

    `model/state_bytes_per_sequence`: what one sequence keeps for generation after `block_size` tokens
    (float32; softmax: its KV cache, which grows with the context; the others: a fixed-size state).
    `model/params_new`: parameters the attention cores add. `model/state_size`: m of a fast-weight core.
    """
    attns = [block.attn for block in net.transformer.h]
    cores = [attn.core for attn in attns if isinstance(attn, ConvertedAttention)]
    state_bytes = sum(
        attn.core.state_bytes(1, block_size)
        if isinstance(attn, ConvertedAttention)
        else kv_cache_bytes(1, attn.num_heads, attn.head_dim, block_size, torch.float32)  # GPT-2's softmax
        for attn in attns
    )
    metrics = {
        "model/state_bytes_per_sequence": float(state_bytes),
        "model/params_new": float(sum(p.numel() for core in cores for p in core.parameters())),
    }
    if cores and hasattr(cores[0], "state_size"):  # fast-weight cores; softmax has no fixed-size state
        metrics["model/state_size"] = float(cores[0].state_size)
    return metrics
