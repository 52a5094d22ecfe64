"""Checkpoints that keep their promise.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin, `conf/trainer/default.yaml`): every checkpoint is
  written to a temporary file beside its destination, flushed to disk (fsync) and renamed over it
  (`os.replace`, atomic within one file system). A kill or a full disk leaves the previous file as it
  was; a full disk is one error, `no space left writing <path>`. Loading is `weights_only=True`:
  a checkpoint is data, and a file that is not a checkpoint (or is truncated) is one ConfigError.
- `LatestCheckpoint` (`last.ckpt`): the latest training state, every `every_n_steps` optimizer steps
  and at the last step, whatever the monitored metric did (the best-by-val/ppl file is Lightning's
  ModelCheckpoint, `best-step*.ckpt`). On a validation step it is written after validation, so the
  resumed run neither repeats nor loses it. Ctrl-C stops training at the next step boundary (a second
  Ctrl-C stops at once) and writes it there, so a resume from it is exact.
- `CrashCheckpoint` (`on-exception*.ckpt`): after another exception during training, the state at
  that moment (mid-step: for an exact resume use last.ckpt). Never written before the resumed
  checkpoint is restored, nor when no step was trained since; never replaces or deletes a file it did
  not write in this run.
- `StopOnNonFiniteLoss`: a NaN or infinite training loss stops the run with one error that names
  the last checkpoint written before it (nothing is written after).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint

from .errors import ConfigError, error_summary  # noqa: F401  (error_summary: its old import path)
from .loading import read_checkpoint as load_checkpoint  # the one data-only reader, under its old name

log = logging.getLogger(__name__)


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (a full disk); the previous file at that path is intact."""


class NonFiniteLossError(ConfigError):
    """The training loss became NaN or infinite; the run stopped without writing anything after it."""


class TrainingInterrupted(Exception):
    """Ctrl-C: training stopped at a step boundary and the state there was written to `path`."""

    def __init__(self, step: int, path: str):
        super().__init__(f"interrupted (Ctrl-C) at step {step}; the state at that step is in {path}")
        self.step, self.path = step, path


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err` or an exception behind it is ENOSPC / EDQUOT (torch's zip writer wraps it in a RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save(obj, path) through a temporary file beside `path`: `path` is the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(err):
            raise CheckpointWriteError(
                f"no space left writing {path} (the previous file there, if any, is intact); free some disk space "
                "and resume from the last checkpoint"
            ) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's local checkpoint IO, with atomic writes beside the destination and data-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, "ckpt_path")


class LatestCheckpoint(Checkpoint):
    """Writes `<dirpath>/<filename>.ckpt`, the latest state: every `every_n_steps` steps, at the last step
    and at the step boundary after a Ctrl-C. Subclasses Checkpoint so Lightning runs it after other callbacks."""

    def __init__(self, dirpath: str, every_n_steps: int, filename: str = "last", stop_on_interrupt: bool = True):
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        self.dirpath, self.filename, self.every_n_steps = dirpath, filename, every_n_steps
        self.stop_on_interrupt = stop_on_interrupt
        self.saved_step: int | None = None  # the step of the last file written in this run
        self._seen_step = -1
        self._after_validation: int | None = None  # a step whose save waits for its validation
        self._interrupt_requested = False
        self._previous_handler: Any = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.filename}.ckpt"

    # -- Ctrl-C --------------------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupt_requested:  # the second Ctrl-C: stop now
            self._restore_handler()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        log.warning("Ctrl-C: stopping at the end of this step and writing %s (Ctrl-C again to stop at once)", self.path)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._interrupt_requested = False
        if self.stop_on_interrupt and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _interrupted(self, trainer: L.Trainer) -> bool:
        # Every rank stops at the same step when any of them was interrupted.
        return bool(trainer.strategy.reduce_boolean_decision(self._interrupt_requested, all=False))

    # -- saving --------------------------------------------------------------------------------------
    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step
        log.info("step %d: wrote %s", trainer.global_step, self.path)

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether Lightning validates right after this batch (its own rule; private API, so guarded)."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except Exception:
            return False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # not a step boundary (gradient accumulation)
            return
        self._seen_step = step
        interrupted = self.stop_on_interrupt and self._interrupted(trainer)
        if interrupted:
            self._save(trainer)
            raise TrainingInterrupted(step, str(self.path))
        if step % self.every_n_steps == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps):
            if self._validation_follows(trainer):
                self._after_validation = step
            else:
                self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        if self._after_validation == step:
            self._after_validation = None
            self._save(trainer)
        if self.stop_on_interrupt and trainer.state.fn == "fit" and self._interrupted(trainer):
            if self.saved_step != step:
                self._save(trainer)
            raise TrainingInterrupted(step, str(self.path))

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}


class CrashCheckpoint(Callback):
    """`<dirpath>/<filename>.ckpt` after an unexpected exception in training (see the module docstring)."""

    # Exceptions after which no crash checkpoint is written: their state is already saved or is not worth saving.
    SKIP = (TrainingInterrupted, NonFiniteLossError, CheckpointWriteError, KeyboardInterrupt, ConfigError)

    def __init__(self, dirpath: str, filename: str = "on-exception"):
        super().__init__()
        self.dirpath, self.filename = dirpath, filename
        self._start_step: int | None = None
        self.written: list[Path] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # the restore (if any) has finished by now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = None  # training is over: a failure in testing leaves the checkpoints as they are

    def _free_path(self) -> Path:
        base = Path(self.dirpath) / self.filename
        candidates = [base.with_name(f"{base.name}.ckpt")] + [base.with_name(f"{base.name}-v{i}.ckpt") for i in range(1, 1000)]
        for path in candidates:
            if path in self.written or not path.exists():
                return path
        raise CheckpointWriteError(f"no free name for a crash checkpoint in {self.dirpath}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._start_step is None or isinstance(exception, self.SKIP) or trainer.global_step <= self._start_step:
            return
        path = self._free_path()
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as err:  # never hide the exception that stopped training
            log.error("could not write the crash checkpoint %s: %s", path, err)
            return
        self.written.append(path)
        log.warning(
            "training failed at step %d: wrote %s (taken mid-step; resume from last.ckpt for an exact resume)",
            trainer.global_step, path,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {}


class StopOnNonFiniteLoss(Callback):
    """Stops training with NonFiniteLossError as soon as a training loss is NaN or infinite."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
        if latest is not None and latest.saved_step is not None:
            kept = f"the last checkpoint is {latest.path} (step {latest.saved_step})"
        else:
            kept = "no checkpoint was written in this run"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        raise NonFiniteLossError(
            f"train/loss is {float(loss.detach().float().mean())} at step {trainer.global_step} (lr {lr:.3g}): training "
            f"stopped and nothing was written after it; {kept}. Lower module.optimizer.lr or check the data"
        )
