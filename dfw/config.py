"""OmegaConf resolvers the configs use; registered once, on import of `dfw`."""

from __future__ import annotations

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, full float32 elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
