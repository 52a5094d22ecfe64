"""LoRA fine-tuning of the pretrained weights through `peft`, while the new attention parameters train fully.

`lora.rank > 0` wraps the converted model in a peft `PeftModel`: each target module (GPT-2's `Conv1D`
layers by name: c_attn, c_proj, c_fc; peft handles their transposed weights with fan_in_fan_out) gets
rank-r adapters, every pretrained weight is frozen, and the parameters conversion added
(`attn.core.*`) are made trainable again. An export merges the adapters into the weights
(`merge_and_unload`), so `dfw.generate` and `model.pretrained=<export>` see a plain converted model.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)


def apply_lora(net: nn.Module, lora: Any) -> nn.Module:
    """`net` with LoRA adapters per the config node `lora` (rank, alpha, dropout, targets); rank 0: `net`
    itself."""
    if not lora or not lora.rank:
        return net
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora.rank, int) or lora.rank < 0:
        raise ConfigError(
            f"lora.rank must be a non-negative integer (0: full fine-tuning), got {lora.rank!r}"
        )
    targets = list(lora.targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
    unknown = [t for t in targets if t not in names]
    if not targets or unknown:
        raise ConfigError(
            f"lora.targets={targets}: no module named {unknown or 'anything'} in the model; "
            "name GPT-2's layers, e.g. [c_attn, c_proj, c_fc]"
        )
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out); peft resets it for nn.Linear
        bias="none",
    )
    peft_net = get_peft_model(net, config)
    for name, p in peft_net.named_parameters():
        if ".attn.core." in name:
            p.requires_grad_(True)  # the new attention parameters train fully
    adapters = sum(p.numel() for name, p in peft_net.named_parameters() if "lora_" in name)
    new = sum(p.numel() for name, p in peft_net.named_parameters() if ".attn.core." in name)
    total = sum(p.numel() for p in peft_net.parameters())
    trainable = sum(p.numel() for p in peft_net.parameters() if p.requires_grad)
    log.info(
        "LoRA rank %d on %s: %s trainable of %s parameters (%s adapter, %s new attention)",
        lora.rank,
        targets,
        f"{trainable:,}",
        f"{total:,}",
        f"{adapters:,}",
        f"{new:,}",
    )
    return peft_net


def trainable_parameter_metrics(net: nn.Module) -> dict[str, float]:
    """`model/params_trainable` and `model/params_total`, logged by dfw.train."""
    return {
        "model/params_trainable": float(sum(p.numel() for p in net.parameters() if p.requires_grad)),
        "model/params_total": float(sum(p.numel() for p in net.parameters())),
    }


def merged(net: nn.Module) -> nn.Module:
    """The plain model with LoRA adapters merged into its weights (in place); `net` itself without LoRA."""
    from peft import PeftModel

    return net.merge_and_unload() if isinstance(net, PeftModel) else net
