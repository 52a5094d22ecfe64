"""Model surgery: replace the attention core of every GPT-2 layer, keeping every pretrained weight.

What is kept: every parameter of the Hugging Face model, under its original key; the attention
projections `c_attn` and `c_proj` move into `ConvertedAttention` unchanged
(`transformer.h.<i>.attn.c_attn.weight` stays the key it was). What is new: the parameters of each
layer's core, under `transformer.h.<i>.attn.core.*`, initialised by the core itself (see
`dfw.attention`: feature maps at the identity, decay gates with zero weights and uniform biases).
A layer whose core is softmax (`dfw.attention.SoftmaxAttention`) is not converted: it keeps
transformers' `GPT2Attention`, so `attention=softmax` is GPT-2 exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .attention import AttentionCore, ConvertedAttention, SoftmaxAttention
from .attention.softmax import kv_cache_bytes
from .errors import instantiate
from .safe_config import build_checked, check_options

log = logging.getLogger(__name__)

# Builds one layer's core: called with hidden_size, num_heads, head_dim, layer_idx, scaling.
CoreFactory = Callable[..., AttentionCore]


def core_factory(attention: DictConfig | dict, source: str | None = None) -> CoreFactory:
    """The `conf/attention/*.yaml` node -> a callable that builds one layer's core.

    `source`: the file the node was read from (an export, a checkpoint). Such a node is checked
    against dfw's own attention classes and options and built without Hydra (`dfw.safe_config`).
    A node of the run's own config is built by Hydra; an option its class does not take is one
    ConfigError naming it.
    """
    if source is not None:
        return build_checked(attention, AttentionCore, source, "attention")
    node = (
        OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
    )
    node.pop("name", None)
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


def convert_attention(model: nn.Module, core_factory: CoreFactory) -> ParameterCounts:
    """Replace `model.transformer.h[i].attn` (GPT2Attention) by ConvertedAttention(core) in place; a layer
    whose core is softmax keeps its GPT2Attention (transformers' own attention, dropout and KV cache)."""
    blocks = model.transformer.h
    before = {id(p): p.numel() for p in model.parameters()}
    for i, block in enumerate(blocks):
        original = block.attn
        if isinstance(original, ConvertedAttention):
            raise ValueError(f"layer {i} is already converted; convert a model once")
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
    log.info("converted %d of %d layers to %s: %s", len(converted), len(blocks), kinds, counts)
    return counts


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
