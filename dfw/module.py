"""The LightningModule: causal language modelling on a (converted) GPT-2, perplexity via torchmetrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity


class LanguageModel(L.LightningModule):
    """Next-token prediction on blocks of `input_ids` [B, T].

    Args:
        net: a GPT2LMHeadModel (converted by `dfw.surgery`).
        optimizer: partial optimizer (Hydra `_partial_: true`), finished here with the parameter groups.
        scheduler: partial LR schedule taking the optimizer, stepped every optimizer step.
        run_config: the resolved run config (hparams["config"]), stored in checkpoints so a checkpoint
        rebuilds its model.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        run_config: dict | None = None,
    ):
        super().__init__()
        # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode:
        # fine-tuning runs with the model's dropout.
        self.net = net.train()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.save_hyperparameters({"config": run_config})
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.net(input_ids=input_ids, use_cache=False).logits  # (B, T, V)

    def _logits_and_targets(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        input_ids = batch["input_ids"]  # (B, T)
        logits = self(input_ids)[:, :-1].float()  # (B, T-1, V), predicts tokens 1..T-1
        return logits, input_ids[:, 1:]  # (B, T-1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits, targets = self._logits_and_targets(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("train/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str, ppl: Perplexity, mean_loss: MeanMetric) -> None:
        logits, targets = self._logits_and_targets(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        ppl.update(logits, targets)
        mean_loss.update(loss, weight=targets.numel())
        self.log(f"{stage}/ppl", ppl, prog_bar=True)
        self.log(f"{stage}/loss", mean_loss)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_ppl, self.val_loss)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_ppl, self.test_loss)

    def configure_optimizers(self) -> Any:
        # No weight decay on biases, norms and gate biases (every parameter with fewer than 2 dims).
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        store_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_run_state(checkpoint)


def store_run_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """What every dfw checkpoint carries besides Lightning's own (fine-tuning's and the transfer stage's):
    the W&B run id, the model config of `module.net` and the RNG states."""
    # `ckpt_path=...` resumes the same W&B run from this id.
    for logger in module.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            checkpoint["wandb_run_id"] = logger.experiment.id
    # The architecture, so a checkpoint rebuilds its model without the hub (dfw.loading).
    checkpoint["model_config"] = module.net.config.to_dict()
    # Lightning does not store RNG states; dropout after a resume must draw what it would have.
    checkpoint["rng_states"] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_run_state(checkpoint: dict[str, Any]) -> None:
    """The RNG states `store_run_state` kept, restored on resume."""
    states = checkpoint.get("rng_states")
    if states is not None:
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def throughput_monitor(window_size: int = 10) -> ThroughputMonitor:
    """Logs train/items_per_sec, where items are tokens (and samples_per_sec, where samples are blocks)."""
    return ThroughputMonitor(
        batch_size_fn=lambda batch: batch["input_ids"].shape[0],
        length_fn=lambda batch: batch["input_ids"].numel(),
        window_size=window_size,
    )
