"""Fine-tune GPT-2 with converted attention: `python -m dfw.train attention=decay model=gpt2`.

Wiring only: seed, data, model, loggers and callbacks, Trainer; validate (the converted model before
any training), fit, test, export. Behaviour lives in `conf/`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

import dfw  # noqa: F401  (registers the config resolvers)

from .checkpointing import TrainingInterrupted, load_checkpoint
from .errors import ConfigError, in_multirun, instantiate, run_or_exit
from .eval import evaluation_after_training
from .lora import apply_lora, merged, trainable_parameter_metrics
from .model import build_model, export
from .surgery import model_size_metrics
from .transfer import STAGE_KEY, checkpoint_stage, run_transfer

log = logging.getLogger(__name__)


# Attention options that change how a core is computed, not what it computes: a resume may change them.
RUNTIME_ATTENTION_OPTIONS = frozenset({"kernel", "chunk_size"})
# GPT2Config fields that fix the architecture: a checkpoint resumes only into the same ones.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "n_inner", "n_positions", "vocab_size", "activation_function")


def _differences(stored: dict, requested: dict, prefix: str, keys: Any) -> list[str]:
    return [
        f"{prefix}.{key}: checkpoint {stored.get(key)!r}, requested {requested.get(key)!r}"
        for key in keys
        if stored.get(key) != requested.get(key)
    ]


def _resume_settings(cfg: DictConfig) -> dict[str, Any]:
    """On `ckpt_path=...`: check the file and that it continues this run (same attention, steps left),
    keep writing checkpoints beside it, reuse its W&B run. Returns its model config (GPT2Config fields)."""
    ckpt = Path(cfg.ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} does not exist; pass the path of a .ckpt file to resume from")
    state = load_checkpoint(ckpt, "ckpt_path")
    stored = (state.get("hyper_parameters") or {}).get("config") or {}
    if not isinstance(stored.get("attention"), dict):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} has no run config: not a checkpoint written by dfw.train")
    requested = OmegaConf.to_container(cfg.attention, resolve=True)
    # The checkpoint's keys: an option added to dfw after it was written is not held against it.
    keys = ["name", *sorted(set(stored["attention"]) - RUNTIME_ATTENTION_OPTIONS - {"name"})]
    differ = _differences(stored["attention"], requested, "attention", keys)
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} was trained with other attention options ({'; '.join(differ)}); resume "
            f"with the checkpoint's options (attention={stored['attention'].get('name')} ...) or start a new run"
        )
    step = int(state.get("global_step", 0))
    if state.get(STAGE_KEY) != "transfer" and step >= cfg.trainer.max_steps:  # (a transfer step is not a fine-tuning step)
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} is already at step {step} and trainer.max_steps={cfg.trainer.max_steps}: "
            "nothing left to train; raise trainer.max_steps to train further"
        )
    with open_dict(cfg):
        for callback in cfg.callbacks.values():
            if callback is not None and "dirpath" in callback:
                callback.dirpath = str(ckpt.parent)
        if "wandb" in cfg.logger and state.get("wandb_run_id"):
            cfg.logger.wandb.id = state["wandb_run_id"]
    return dict(state.get("model_config") or {})


def _check_resumed_model(cfg: DictConfig, stored: dict[str, Any], net: Any) -> None:
    differ = _differences(stored, net.config.to_dict(), "model", ARCHITECTURE_FIELDS)
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} holds another model ({'; '.join(differ)}); resume with the model it was "
            "trained with or start a new run"
        )


def _check_run_options(cfg: DictConfig) -> None:
    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        raise ConfigError(f"trainer.max_steps must be a positive integer (training is step-based), got {max_steps!r}")
    if cfg.get("export_weights", "final") not in ("final", "best"):
        raise ConfigError(f"export_weights must be final or best, got {cfg.export_weights!r}")


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

    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if best and checkpoint.best_model_score is not None:
        metrics["val/ppl_best"] = float(checkpoint.best_model_score)
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: v for k, v in _metrics(trainer).items() if k.startswith("test/")})
    if cfg.get("export_dir") and isinstance(trainer.strategy, FSDPStrategy):
        log.warning("no export under FSDP (the parameters are sharded): use the .ckpt, e.g. with dfw.generate")
    elif cfg.get("export_dir") and trainer.is_global_zero:
        weights, step = "final", trainer.global_step
        if cfg.get("export_weights") == "best" and best:
            checkpoint = load_checkpoint(best, "best checkpoint")
            module.load_state_dict(checkpoint["state_dict"])
            weights, step = "best", int(checkpoint["global_step"])
        elif cfg.get("export_weights") == "best":
            log.warning("export_weights=best, but no best checkpoint was written: exporting the final weights")
        export(merged(module.net), cfg.attention, cfg.export_dir, tokenizer=datamodule.tokenizer, weights=weights, step=step)
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
        run_config=module.hparams["config"],
    )  # fmt: skip


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; returns the final metrics (val/ppl at conversion as `val/ppl_converted`)."""
    _check_run_options(cfg)
    resumed = _resume_settings(cfg) if cfg.get("ckpt_path") else None
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = build_model(cfg.model, cfg.attention, datamodule.tokenizer)
    _check_sizes(cfg, net)
    evaluation = evaluation_after_training(cfg, net, datamodule)  # eval.tasks=[...]: checked now, run after training
    if resumed is not None:
        _check_resumed_model(cfg, resumed, net)
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
        if evaluation is not None and trainer.is_global_zero and not isinstance(trainer.strategy, FSDPStrategy):
            metrics.update(evaluation.run(merged(module.net), trainer.loggers, step=trainer.global_step))
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
    try:
        metrics = run_or_exit(train, cfg, logger=log)
    except TrainingInterrupted as stop:
        log.error("%s; resume with ckpt_path=%s", stop, stop.path)
        sys.exit(130)  # the shell's code for a run ended by Ctrl-C
    # Returned for Hydra sweepers that optimise a value.
    return metrics.get("val/ppl")


if __name__ == "__main__":
    main()
