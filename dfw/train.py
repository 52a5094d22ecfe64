"""Fine-tune GPT-2 with converted attention: `python -m dfw.train attention=decay model=gpt2`.

Wiring only: seed, data, model, loggers and callbacks, Trainer; validate (the converted model before
any training), fit, test, export. Behaviour lives in `conf/`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

import dfw  # noqa: F401  (registers the config resolvers)

from .errors import ConfigError, in_multirun, instantiate, run_or_exit
from .lora import apply_lora, merged, trainable_parameter_metrics
from .model import build_model, export
from .surgery import model_size_metrics
from .transfer import checkpoint_stage, run_transfer

log = logging.getLogger(__name__)


def _resume_settings(cfg: DictConfig) -> None:
    """On `ckpt_path=...`: check the file, keep writing checkpoints beside it, reuse its W&B run."""
    ckpt = Path(cfg.ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist; pass the path of a .ckpt file to resume from")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    with open_dict(cfg):
        for callback in cfg.callbacks.values():
            if callback is not None and "dirpath" in callback:
                callback.dirpath = str(ckpt.parent)
        if "wandb" in cfg.logger and state.get("wandb_run_id"):
            cfg.logger.wandb.id = state["wandb_run_id"]


def _check_sizes(cfg: DictConfig, net: Any) -> None:
    n_positions = net.config.n_positions
    if cfg.data.block_size > n_positions:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} is longer than the model's context "
            f"({n_positions} learned positions of model={cfg.model.name}); lower data.block_size to at most {n_positions}"
        )


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _fit_and_test(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: Any) -> dict[str, float]:
    metrics: dict[str, float] = {}
    stage = checkpoint_stage(cfg.get("ckpt_path"))  # None, "transfer" (inside the transfer stage) or "finetune"
    if cfg.validate_before_fit and stage is None:
        # The converted model before any fine-tuning: how much conversion alone costs.
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics["val/ppl_converted"] = float(trainer.callback_metrics["val/ppl"])
    if stage != "finetune" and _transfer(cfg, trainer, module, datamodule, resume=stage == "transfer"):
        # After attention transfer (dfw/transfer.py), before fine-tuning.
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics["val/ppl_transfer"] = float(trainer.callback_metrics["val/ppl"])
    module.net = apply_lora(module.net, cfg.get("lora"))
    for logger in trainer.loggers:
        logger.log_metrics(trainable_parameter_metrics(module.net), step=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if stage == "finetune" else None)
    metrics.update(_metrics(trainer))

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
    if best and checkpoint.best_model_score is not None:
        metrics["val/ppl_best"] = float(checkpoint.best_model_score)
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: v for k, v in _metrics(trainer).items() if k.startswith("test/")})
    if cfg.get("export_dir") and isinstance(trainer.strategy, FSDPStrategy):
        log.warning("no export under FSDP (the parameters are sharded): use the .ckpt, e.g. with dfw.generate")
    elif cfg.get("export_dir") and trainer.is_global_zero:
        export(merged(module.net), cfg.attention, cfg.export_dir, tokenizer=datamodule.tokenizer)
    return metrics


def _transfer(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: Any, resume: bool) -> bool:
    """The attention transfer stage (`transfer.*`), with a trainer of its own and the run's loggers."""
    if not cfg.get("transfer"):
        return False
    checkpoint = cfg.callbacks.get("model_checkpoint") if cfg.get("callbacks") else None
    return run_transfer(
        cfg.transfer, module.net, datamodule,
        make_trainer=lambda **overrides: instantiate(cfg.trainer, logger=trainer.loggers or False, **overrides),
        checkpoint_dir=checkpoint.dirpath if checkpoint else None,
        ckpt_path=cfg.ckpt_path if resume else None,
    )  # fmt: skip


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; returns the final metrics (val/ppl at conversion as `val/ppl_converted`)."""
    if cfg.get("ckpt_path"):
        _resume_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = build_model(cfg.model, cfg.attention, datamodule.tokenizer)
    _check_sizes(cfg, net)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = instantiate(cfg.module, _partial_=True)(net=net, run_config=config)

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if in_multirun() and trainer.num_devices > 1 and "SLURM_JOB_ID" not in os.environ:
        raise ConfigError(
            f"trainer.devices={trainer.num_devices} inside a -m sweep: Lightning would start the whole sweep again in "
            "every process; run multi-GPU jobs one at a time, or sweep through hydra/launcher=slurm"
        )
    size = model_size_metrics(net, cfg.data.block_size)
    for logger in trainer.loggers:
        logger.log_hyperparams(config)
        logger.log_metrics(size, step=0)
        if isinstance(logger, WandbLogger):
            log.info("W&B run %s written to %s", logger.experiment.id, logger.experiment.dir)

    try:
        metrics = _fit_and_test(cfg, trainer, module, datamodule)
    finally:
        # Close W&B runs: a later train() in this process (the demo's second stage, a test) must
        # start a run of its own rather than continue this one.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
    for name, value in sorted(metrics.items()):
        log.info("%s = %.4g", name, value)
    if not all(math.isfinite(v) for v in metrics.values()):
        log.warning("some metrics are not finite: %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_or_exit(train, cfg, logger=log)
    # Returned for Hydra sweepers that optimise a value.
    return metrics.get("val/ppl")


if __name__ == "__main__":
    main()
