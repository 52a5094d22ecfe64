"""Fine-tune GPT-2 with converted attention: `python -m dfw.train attention=decay model=gpt2`.

Wiring only: seed, data, model, loggers and callbacks, Trainer; validate (the converted model before
any training), fit, test, export. Behaviour lives in `conf/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

import dfw  # noqa: F401  (registers the config resolvers)

from . import run_folder
from .checkpointing import LatestCheckpoint, TrainingInterrupted, checkpoint_step
from .data import LanguageModelingDataModule
from .errors import ConfigError, check_config_choices, in_multirun, instantiate, run_or_exit
from .eval import evaluation_after_training
from .loading import STAGE_KEY, checkpoint_stage, read_checkpoint, saved_attention
from .lora import apply_lora, merged, trainable_parameter_metrics
from .model import build_model, export
from .presets import config_dir
from .surgery import model_size_metrics, softmax_layers
from .transfer import run_transfer

log = logging.getLogger(__name__)


# Attention options that change how a core is computed, not what it computes: a resume may change them.
RUNTIME_ATTENTION_OPTIONS = frozenset({"kernel", "chunk_size"})
# GPT2Config fields that fix the architecture: a checkpoint resumes only into the same ones.
ARCHITECTURE_FIELDS = (
    "n_layer",
    "n_head",
    "n_embd",
    "n_inner",
    "n_positions",
    "vocab_size",
    "activation_function",
)


def _differences(stored: dict, requested: dict, prefix: str, keys: Any) -> list[str]:
    return [
        f"{prefix}.{key}: checkpoint {stored.get(key)!r}, requested {requested.get(key)!r}"
        for key in keys
        if stored.get(key) != requested.get(key)
    ]


# Where Lightning stores a datamodule's state_dict in a checkpoint: under its class's name.
_DATA_STATE_KEY = LanguageModelingDataModule.__qualname__
# The files that hold a run's latest state, and the stage each belongs to (transfer before fine-tuning).
LATEST_FILES = {"last.ckpt": "finetune", "transfer-last.ckpt": "transfer"}


def _progress(stage: str | None, step: int) -> tuple[bool, int]:
    """Orders training states: every fine-tuning step comes after every transfer step."""
    return (stage != "transfer", step)


def _later_state(
    folder: Path, stage: str | None, step: int, resumed: Path | None = None
) -> tuple[Path, int] | None:
    """A latest-state file in `folder` (other than `resumed`) that is further on than (stage, step), if
    any."""
    for name, file_stage in LATEST_FILES.items():
        path = folder / name
        if path.is_file() and (resumed is None or not path.samefile(resumed)):
            held = checkpoint_step(path)
            if held is not None and _progress(file_stage, held) > _progress(stage, step):
                return path, held
    return None


def _checkpoint_dirs(cfg: DictConfig) -> dict[str, str]:
    """callbacks.<name>.dirpath for every callback that writes checkpoints."""
    callbacks = cfg.get("callbacks") or {}
    return {
        f"callbacks.{name}.dirpath": str(c.dirpath)
        for name, c in callbacks.items()
        if c is not None and "dirpath" in c
    }


def _latest_dir(cfg: DictConfig) -> Path | None:
    latest = (cfg.get("callbacks") or {}).get("last_checkpoint")
    return Path(str(latest.dirpath)) if latest is not None and "dirpath" in latest else None


def _resume_after_requeue(cfg: DictConfig) -> None:
    """A SLURM job that the scheduler requeued runs its command line again (SLURM_RESTART_COUNT > 0): it
    resumes from the latest state it wrote, which is later than its ckpt_path, if it had one."""
    if "SLURM_JOB_ID" not in os.environ or not os.environ.get("SLURM_RESTART_COUNT", "0").strip("0"):
        return
    resumed = Path(cfg.ckpt_path).expanduser() if cfg.get("ckpt_path") else None
    start = (
        (None, -1)
        if resumed is None or not resumed.is_file()
        else (checkpoint_stage(str(resumed)), checkpoint_step(resumed) or 0)
    )
    folders = [f for f in (_latest_dir(cfg), resumed.parent if resumed else None) if f is not None]
    later = [found for folder in folders if (found := _later_state(folder, *start, resumed))]
    if later:
        path = max(later, key=lambda found: _progress(LATEST_FILES[found[0].name], found[1]))[0]
        log.info(
            "SLURM job %s was requeued (restart %s): resuming from %s",
            os.environ["SLURM_JOB_ID"],
            os.environ["SLURM_RESTART_COUNT"],
            path,
        )
        with open_dict(cfg):
            cfg.ckpt_path = str(path)


def _check_fresh_folder(cfg: DictConfig) -> None:
    """A new run (no ckpt_path) never writes over the latest state of an earlier run in its folder."""
    folder = _latest_dir(cfg)
    for name in LATEST_FILES:
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            raise ConfigError(
                f"{path} exists (step {checkpoint_step(path)}) from an earlier run in this folder: resume it "
                f"with ckpt_path={path}, or start this run in a new folder (hydra.run.dir=... or "
                "paths.output_dir=...)"
            )


def _resume_settings(cfg: DictConfig) -> dict[str, Any]:
    """On `ckpt_path=...`: check the file and that it continues this run (same attention, steps left),
    keep writing checkpoints beside it unless a later state is there, reuse its W&B run. Returns its model
    config (GPT2Config fields) and the identity of the data it was trained on (or None)."""
    ckpt = Path(cfg.ckpt_path).expanduser()
    if not ckpt.is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} does not exist; pass the path of a .ckpt file to resume from"
        )
    state = read_checkpoint(ckpt, "ckpt_path")
    stored = (state.get("hyper_parameters") or {}).get("config") or {}
    if not isinstance(stored.get("attention"), dict):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} has no run config: not a checkpoint written by dfw.train"
        )
    requested = OmegaConf.to_container(cfg.attention, resolve=True)
    # The checkpoint's keys: an option added to dfw after it was written is not held against it.
    keys = ["name", *sorted(set(stored["attention"]) - RUNTIME_ATTENTION_OPTIONS - {"name"})]
    differ = _differences(stored["attention"], requested, "attention", keys)
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} was trained with other attention options ({'; '.join(differ)}); "
            f"resume with the checkpoint's options (attention={stored['attention'].get('name')} ...) or "
            "start a new run"
        )
    step = int(state.get("global_step", 0))
    stage = state.get(STAGE_KEY, "finetune")
    if stage != "transfer" and step >= cfg.trainer.max_steps:  # (a transfer step is not a fine-tuning step)
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} is already at step {step} and "
            f"trainer.max_steps={cfg.trainer.max_steps}: nothing left to train; raise trainer.max_steps to "
            "train further"
        )
    # Checkpoints never go back in time: beside the resumed file, unless a later state is there.
    target = ckpt.parent
    later = _later_state(target, stage, step, ckpt)
    if later is not None:
        own = _latest_dir(cfg)
        if (
            own is None
            or own.absolute() == target.absolute()
            or _later_state(own, stage, step, ckpt) is not None
        ):
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path!r} is at step {step}, but {later[0]} holds a later state (step "
                f"{later[1]}) that resuming there would overwrite; resume from {later[0]}, or give this run "
                "a new folder (paths.output_dir=<new folder>)"
            )
        log.warning(
            "ckpt_path=%s is at step %d, but %s holds a later state (step %d): this run writes its "
            "checkpoints to %s instead, and that state is kept",
            ckpt,
            step,
            later[0],
            later[1],
            own,
        )
        target = own
    with open_dict(cfg):
        for callback in cfg.callbacks.values():
            if callback is not None and "dirpath" in callback:
                callback.dirpath = str(target)
        if "wandb" in cfg.logger and state.get("wandb_run_id"):
            cfg.logger.wandb.id = state["wandb_run_id"]
    data = (state.get(_DATA_STATE_KEY) or {}).get("identity")
    return {"model": dict(state.get("model_config") or {}), "data": data, "config": stored}


def _check_resumed_data(cfg: DictConfig, resumed: dict[str, Any], datamodule: Any) -> None:
    """The data a checkpoint was trained on is the data it resumes on: same tokens (per split), tokenizer,
    block and batch sizes, seed and gradient accumulation; else one error naming what changed."""
    stored = resumed.get("data")
    if not isinstance(stored, dict):
        log.warning(
            "ckpt_path=%s records no data identity (written by an earlier dfw): its data is not checked",
            cfg.ckpt_path,
        )
        return
    current = datamodule.identity()
    differ = [
        f"data.{key}: checkpoint {stored.get(key)!r}, requested {current[key]!r}"
        for key in ("block_size", "batch_size", "seed")
        if stored.get(key) != current[key]
    ]
    if stored.get("tokenizer") != current["tokenizer"]:
        differ.append(
            f"the tokenizer (model.tokenizer={cfg.model.get('tokenizer')!r}) is not the checkpoint's"
        )
    stored_tokens = stored.get("tokens_sha256") or {}
    for split, digest in current["tokens_sha256"].items():
        if stored_tokens.get(split) != digest:
            differ.append(
                f"the {split} split's text is not the checkpoint's (data.corpus={current['corpus']}, corpus "
                f"fingerprint {str(stored.get('corpus_fingerprint'))[:60]!r} then, "
                f"{str(current['corpus_fingerprint'])[:60]!r} now)"
            )
    accumulate = ((resumed.get("config") or {}).get("trainer") or {}).get("accumulate_grad_batches")
    if accumulate is not None and accumulate != cfg.trainer.accumulate_grad_batches:
        differ.append(
            f"trainer.accumulate_grad_batches: checkpoint {accumulate}, requested "
            f"{cfg.trainer.accumulate_grad_batches}"
        )
    if not differ:
        return
    if (cfg.get("resume") or {}).get("allow_data_change"):
        log.warning(
            "resume.allow_data_change=true: resuming %s on other data (%s)", cfg.ckpt_path, "; ".join(differ)
        )
        return
    raise ConfigError(
        f"ckpt_path={cfg.ckpt_path!r} was trained on other data ({'; '.join(differ)}), so the resumed data "
        "order would not continue it; resume with the checkpoint's data options, or pass "
        "resume.allow_data_change=true"
    )


def _check_output_locations(cfg: DictConfig) -> None:
    """Every folder the run writes into can be written, and the export target is not someone else's folder:
    checked before anything is built, so a bad location fails at start, not after training."""
    folders = {"paths.output_dir": str(cfg.paths.output_dir), **_checkpoint_dirs(cfg)}
    if cfg.get("export_dir"):
        folders["export_dir"] = str(cfg.export_dir)
    for option, folder in folders.items():
        problem = run_folder.unwritable(folder)
        if problem:
            raise ConfigError(f"{option}={folder!r}: {problem}; choose a writable folder")
    export_dir = Path(str(cfg.export_dir)).expanduser() if cfg.get("export_dir") else None
    if export_dir is not None and export_dir.exists():
        if not export_dir.is_dir():
            raise ConfigError(
                f"export_dir={str(export_dir)!r} is a file; choose a folder for the exported model"
            )
        try:
            exported = saved_attention(export_dir) is not None
        except ConfigError:
            exported = False
        if any(export_dir.iterdir()) and not exported:
            raise ConfigError(
                f"export_dir={str(export_dir)!r} holds files that are not a model exported by dfw; choose "
                "another folder (or empty it), or export_dir=null for no export"
            )


def _check_resumed_model(cfg: DictConfig, stored: dict[str, Any], net: Any) -> None:
    differ = _differences(stored, net.config.to_dict(), "model", ARCHITECTURE_FIELDS)
    if differ:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} holds another model ({'; '.join(differ)}); resume with the model "
            "it was trained with or start a new run"
        )


def _check_run_options(cfg: DictConfig) -> None:
    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        raise ConfigError(
            f"trainer.max_steps must be a positive integer (training is step-based), got {max_steps!r}"
        )
    if cfg.get("export_weights", "final") not in ("final", "best"):
        raise ConfigError(f"export_weights must be final or best, got {cfg.export_weights!r}")
    allow = (cfg.get("resume") or {}).get("allow_data_change", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"resume.allow_data_change must be true or false, got {allow!r}")


def _known_layer_count(model: DictConfig) -> int | None:
    """The number of layers of `model` where it is known without loading weights: a fresh model's config
    (GPT2Config's default when unset), a local directory's config.json; None otherwise (a hub id)."""
    from transformers import GPT2Config

    try:
        pretrained = model.get("pretrained")
        if not pretrained:
            fields = model.get("config") or {}
            return int(fields.get("n_layer", GPT2Config().n_layer))
        config = Path(str(pretrained)).expanduser() / "config.json"
        return int(json.loads(config.read_text())["n_layer"]) if config.is_file() else None
    except Exception:  # an unset interpolation, an unreadable file: build_model reports those
        return None


def _check_softmax_layers(cfg: DictConfig) -> None:
    """attention.softmax_layers, before anything is built: its form always, its range where the number of
    layers is known from the config (else at conversion, `dfw.surgery.convert_to`, before any training)."""
    softmax_layers(cfg.attention, _known_layer_count(cfg.model))


def _check_sizes(cfg: DictConfig, net: Any) -> None:
    n_positions = net.config.n_positions
    if cfg.data.block_size > n_positions:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} is longer than the model's context "
            f"({n_positions} learned positions of model={cfg.model.name}); lower data.block_size to at most "
            f"{n_positions}"
        )


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: Any
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    stage = checkpoint_stage(
        cfg.get("ckpt_path")
    )  # None, "transfer" (inside the transfer stage) or "finetune"
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
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if stage == "finetune" else None
    )
    metrics.update(_metrics(trainer))

    checkpoint = next(
        (c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None
    )
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if best and checkpoint.best_model_score is not None:
        metrics["val/ppl_best"] = float(checkpoint.best_model_score)
    # The weights the run exports are the ones its final metrics and its test describe: the final weights
    # (validated at the last step, ValidateLastStep), or the best checkpoint's with export_weights=best.
    weights, step = "final", trainer.global_step
    if cfg.get("export_weights") == "best" and best:
        state = read_checkpoint(best, "best checkpoint")
        module.load_state_dict(state["state_dict"])
        weights, step = "best", int(state["global_step"])
        metrics["val/ppl"] = float(checkpoint.best_model_score)
    elif cfg.get("export_weights") == "best":
        log.warning("export_weights=best, but no best checkpoint was written: exporting the final weights")
    metrics["weights/step"] = float(step)  # the step of the weights that val/ppl, test/* and the export hold
    log.info("final metrics and the test are of the %s weights (step %d)", weights, step)
    if cfg.test:
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update({k: v for k, v in _metrics(trainer).items() if k.startswith("test/")})
    if cfg.get("export_dir") and isinstance(trainer.strategy, FSDPStrategy):
        log.warning(
            "no export under FSDP (the parameters are sharded): use the .ckpt, e.g. with dfw.generate"
        )
    elif cfg.get("export_dir") and trainer.is_global_zero:
        export(
            merged(module.net),
            cfg.attention,
            cfg.export_dir,
            tokenizer=datamodule.tokenizer,
            weights=weights,
            step=step,
        )
    return metrics


def _transfer(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule: Any, resume: bool
) -> bool:
    """The attention transfer stage (`transfer.*`), with a trainer of its own and the run's loggers."""
    if not cfg.get("transfer"):
        return False
    checkpoint = cfg.callbacks.get("model_checkpoint") if cfg.get("callbacks") else None
    return run_transfer(
        cfg.transfer,
        module.net,
        datamodule,
        make_trainer=lambda **overrides: instantiate(
            cfg.trainer, logger=trainer.loggers or False, **overrides
        ),
        checkpoint_dir=checkpoint.dirpath if checkpoint else None,
        ckpt_path=cfg.ckpt_path if resume else None,
        run_config=module.hparams["config"],
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; returns the final metrics (val/ppl at conversion as `val/ppl_converted`)."""
    _check_run_options(cfg)
    _check_softmax_layers(cfg)
    _check_output_locations(cfg)
    _resume_after_requeue(cfg)
    resumed = _resume_settings(cfg) if cfg.get("ckpt_path") else None
    if resumed is None:
        _check_fresh_folder(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(
        cfg.data, _convert_="all"
    )  # plain containers: checkpoints load with weights_only
    datamodule.prepare_data()
    datamodule.setup("fit")
    if resumed is not None and isinstance(datamodule, LanguageModelingDataModule):
        _check_resumed_data(cfg, resumed, datamodule)
    net = build_model(cfg.model, cfg.attention, datamodule.tokenizer)
    _check_sizes(cfg, net)
    evaluation = evaluation_after_training(
        cfg, net, datamodule
    )  # eval.tasks=[...]: checked now, run after training
    if resumed is not None:
        _check_resumed_model(cfg, resumed["model"], net)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = instantiate(cfg.module, _partial_=True)(net=net, run_config=config)

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if in_multirun() and trainer.num_devices > 1 and "SLURM_JOB_ID" not in os.environ:
        raise ConfigError(
            f"trainer.devices={trainer.num_devices} inside a -m sweep: Lightning would start the whole sweep "
            "again in every process; run multi-GPU jobs one at a time, or sweep through hydra/launcher=slurm"
        )
    # Every check has passed: from here on the run owns its folders (one run per folder) and writes into them.
    with run_folder.locked([cfg.paths.output_dir, *_checkpoint_dirs(cfg).values()]):
        run_folder.write_held_back()
        size = model_size_metrics(net, cfg.data.block_size)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            logger.log_metrics(size, step=0)
            if isinstance(logger, WandbLogger):
                log.info("W&B run %s written to %s", logger.experiment.id, logger.experiment.dir)
        try:
            metrics = _fit_and_test(cfg, trainer, module, datamodule)
            if (
                evaluation is not None
                and trainer.is_global_zero
                and not isinstance(trainer.strategy, FSDPStrategy)
            ):
                metrics.update(evaluation.run(merged(module.net), trainer.loggers, step=trainer.global_step))
        except SIGTERMException:
            # Lightning's own stop for a SIGTERM that came outside a training step (in a validation or the
            # test).
            latest = next((c for c in callbacks if isinstance(c, LatestCheckpoint)), None)
            if latest is not None and latest.interrupted is not None:
                raise latest.interrupted from None
            path = str(latest.path) if latest is not None and latest.path.is_file() else "no checkpoint"
            raise TrainingInterrupted(trainer.global_step, path, signum=signal.SIGTERM) from None
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


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _run(cfg: DictConfig) -> float | None:
    try:
        metrics = run_or_exit(train, cfg, logger=log)
    except TrainingInterrupted as stop:
        if stop.requeued:
            log.error("%s; it resumes from %s when SLURM starts it again", stop, stop.path)
        else:
            log.error("%s; resume with ckpt_path=%s", stop, stop.path)
        sys.exit(
            stop.exit_code
        )  # 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (a scheduler sees a stopped job)
    except Exception:
        run_folder.write_held_back()  # not bad input but a failure: the run folder keeps its config and log
        raise
    # Returned for Hydra sweepers that optimise a value.
    return metrics.get("val/ppl")


def main() -> float | None:
    """`python -m dfw.train` and `dfw-train`: a config group option that does not exist is one line,
    exit 2."""
    check_config_choices(config_dir(), sys.argv[1:])
    return _run()


if __name__ == "__main__":
    main()
