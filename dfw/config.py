"""OmegaConf resolvers the configs use; registered once, on import of `dfw`."""

from __future__ import annotations

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, full float32 elsewhere."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def budget_left(budget_steps: int | None, transfer_steps: int) -> int:
    """Fine-tuning steps a recipe leaves after transfer: `budget_steps - transfer.steps` (conf/recipe/)."""
    from .errors import ConfigError

    if budget_steps is None:
        raise ConfigError(
            "recipes (conf/recipe/) split budget_steps, the optimizer steps of transfer and fine-tuning "
            "together, between their stages; set budget_steps=<steps>, e.g. budget_steps=400"
        )
    if not 0 <= transfer_steps < budget_steps:
        raise ConfigError(
            f"transfer.steps={transfer_steps} leaves no fine-tuning within budget_steps={budget_steps}"
        )
    return budget_steps - transfer_steps


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("budget_left"):
        OmegaConf.register_new_resolver("budget_left", budget_left)
