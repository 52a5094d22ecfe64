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
  Ctrl-C stops at once) and writes it there, so a resume from it is exact. So do the `stop_signals`
  (SIGTERM, which a scheduler sends before it preempts a job, and SIGUSR1, which SLURM sends before a time
  limit with `--signal=USR1@<seconds>`): SIGTERM through Lightning's own signal connector
  (`trainer.received_sigterm`, shared by every rank), the others through a handler of this callback. Under
  SLURM, with Lightning's `SLURMEnvironment(auto_requeue=True)` (its default), the requeue signal also
  requeues the job (`scontrol requeue`), and the requeued job resumes from `last.ckpt` (`dfw.train`).
  It never overwrites a file of a later step that this run did not write.
- `ValidateLastStep`: every fit validates its last step, whatever `val_check_interval` is (Lightning
  validates when a callback sets `trainer.should_stop`), so the last metrics are the final weights'.
- `CrashCheckpoint` (`on-exception*.ckpt`): after another exception during training, the state at
  that moment (mid-step: for an exact resume use last.ckpt). Never written before the resumed
  checkpoint is restored, nor when no step was trained since; never replaces or deletes a file it did
  not write in this run.
- `StopOnNonFiniteLoss`: a NaN or infinite training loss, or validation loss, stops the run with one error
  that names the last checkpoint written before it (nothing is written after, and no NaN is ever "best").
- Checkpoint files get the permissions the user's umask gives (as a plain `open` would), so the other
  users of a shared project folder can read them when the umask lets them.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import ConfigError, error_summary  # noqa: F401  (error_summary: its old import path)
from .loading import read_checkpoint as load_checkpoint  # the one data-only reader, under its old name

log = logging.getLogger(__name__)


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (a full disk); the previous file at that path is intact."""


class NonFiniteLossError(ConfigError):
    """The training loss became NaN or infinite; the run stopped without writing anything after it."""


class TrainingInterrupted(Exception):
    """Ctrl-C or a stop signal: training stopped at a step boundary and the state there was written to `path`.

    `exit_code` is the shell's code for a process ended by that signal (128 + its number: 130 for Ctrl-C,
    143 for SIGTERM), so a scheduler records the job as stopped, not completed."""

    def __init__(self, step: int, path: str, signum: int = signal.SIGINT, requeued: str | None = None):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        message = f"interrupted ({name}) at step {step}; the state at that step is in {path}"
        super().__init__(message + (f"; requeued SLURM job {requeued}" if requeued else ""))
        self.step, self.path, self.signum, self.requeued = step, path, int(signum), requeued

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err` or an exception behind it is ENOSPC / EDQUOT (torch's zip writer wraps it in a
    RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


_umask_lock = threading.Lock()


def _umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, and put back at once)."""
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save(obj, path) through a temporary file beside `path`: `path` is the old file or the whole new
    one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(
            fd, 0o666 & ~_umask()
        )  # mkstemp makes it owner-only; a checkpoint gets what `open` would give
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(err):
            raise CheckpointWriteError(
                f"no space left writing {path} (the previous file there, if any, is intact); free some disk "
                "space and resume from the last checkpoint"
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

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, "ckpt_path")


def checkpoint_step(path: str | Path) -> int | None:
    """The `global_step` a checkpoint file holds (None when there is no readable checkpoint there)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return int(checkpoint.get("global_step", 0)) if isinstance(checkpoint, dict) else None


def slurm_requeue(trainer: L.Trainer, signum: int) -> str | None:
    """`scontrol requeue <job>` when this run is a SLURM job whose Lightning SLURMEnvironment has
    `auto_requeue` and `signum` is its requeue signal (Lightning's own convention); returns the job id."""
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)  # private: guarded
    if not (
        isinstance(environment, SLURMEnvironment)
        and environment.auto_requeue
        and environment.requeue_signal == signum
    ):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ.get("SLURM_JOB_ID", "")
    )
    if not re.fullmatch(r"[0-9_]+", job):
        return None
    if trainer.is_global_zero:
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("could not requeue SLURM job %s (%s): resubmit it to resume", job, err)
            return None
        if result.returncode != 0:
            log.error(
                "scontrol requeue %s failed (%s): resubmit the job to resume", job, result.stderr.strip()
            )
            return None
    return job


def _signal_number(name: Any) -> int:
    try:
        return int(signal.Signals[str(name)]) if not isinstance(name, int) else int(signal.Signals(name))
    except (KeyError, ValueError):
        raise ConfigError(
            f"callbacks.last_checkpoint.stop_signals: {name!r} is not a signal; use names such as SIGTERM or "
            "SIGUSR1"
        ) from None


class LatestCheckpoint(Checkpoint):
    """Writes `<dirpath>/<filename>.ckpt`, the latest state: every `every_n_steps` steps, at the last step
    and at the step boundary after a Ctrl-C or a stop signal. Subclasses Checkpoint so Lightning runs it after
    other callbacks."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int,
        filename: str = "last",
        stop_on_interrupt: bool = True,
        stop_signals: Any = ("SIGTERM", "SIGUSR1"),
    ):
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ConfigError(
                f"callbacks.last_checkpoint.every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        self.dirpath, self.filename, self.every_n_steps = dirpath, filename, every_n_steps
        self.stop_on_interrupt = stop_on_interrupt
        self.stop_signals = [_signal_number(name) for name in (stop_signals or ())]
        self.saved_step: int | None = None  # the step of the last file written in this run
        self._seen_step = -1
        self._after_validation: int | None = None  # a step whose save waits for its validation
        self._interrupt_requested = False
        self._signal_received: int | None = (
            None  # a stop signal other than SIGTERM (SIGTERM: Lightning's flag)
        )
        self._previous_handlers: dict[int, Any] = {}
        self._existing_step: int | None = None  # the step of a file at `path` that this run did not write
        self.interrupted: TrainingInterrupted | None = (
            None  # set when a Ctrl-C or a stop signal stopped training
        )

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.filename}.ckpt"

    # -- Ctrl-C and stop signals ---------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupt_requested:  # the second Ctrl-C: stop now
            self._restore_handlers()
            raise KeyboardInterrupt
        self._interrupt_requested = True
        log.warning(
            "Ctrl-C: stopping at the end of this step and writing %s (Ctrl-C again to stop at once)",
            self.path,
        )

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signal_received = signum
        log.warning(
            "%s: stopping at the end of this step and writing %s", signal.Signals(signum).name, self.path
        )

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._interrupt_requested = False
        self._signal_received = None
        if self.saved_step is None and self.path.is_file():
            self._existing_step = checkpoint_step(self.path)
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning registered its SIGTERM handler (and, under SLURM with auto_requeue, a requeue handler that
        # saves mid-step) before this hook; SIGTERM stays Lightning's, the other stop signals become ours.
        handlers = {signum: self._on_stop_signal for signum in self.stop_signals if signum != signal.SIGTERM}
        if self.stop_on_interrupt:
            handlers[signal.SIGINT] = self._on_sigint
        for signum, handler in handlers.items():
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        stops = isinstance(exception, SIGTERMException) and signal.SIGTERM in self.stop_signals
        if stops and trainer.state.fn == "fit" and self.interrupted is None:
            # Lightning stops a validation that a SIGTERM interrupts (the training step before it is
            # complete): the state is written there, and a resume goes back to finish the validation
            # (Lightning's restart).
            try:
                self._stop(trainer, signal.SIGTERM)
            except TrainingInterrupted:
                pass
            except Exception as err:  # never hide the exception that stopped training
                log.error("could not write %s after SIGTERM: %s", self.path, err)

    def _stop_signal(self, trainer: L.Trainer) -> int | None:
        """The signal to stop at this step boundary for, if any; every rank stops at the same step."""
        if self._interrupt_requested and self.stop_on_interrupt:
            local = int(signal.SIGINT)
        elif signal.SIGTERM in self.stop_signals and trainer.received_sigterm:
            local = int(signal.SIGTERM)
        else:
            local = self._signal_received or 0
        if not trainer.strategy.reduce_boolean_decision(bool(local), all=False):
            return None
        # A rank that saw no signal itself stops for the one another rank saw (SIGTERM is the usual one).
        return local or int(signal.SIGTERM)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        if self.saved_step != trainer.global_step:
            self._save(trainer)
        requeued = slurm_requeue(trainer, signum) if signum != signal.SIGINT else None
        self.interrupted = TrainingInterrupted(
            trainer.global_step, str(self.path), signum=signum, requeued=requeued
        )
        raise self.interrupted

    # -- saving --------------------------------------------------------------------------------------
    def _save(self, trainer: L.Trainer) -> None:
        if (
            self.saved_step is None
            and self._existing_step is not None
            and self._existing_step > trainer.global_step
        ):
            raise CheckpointWriteError(
                f"{self.path} holds step {self._existing_step}, later than this run's step "
                f"{trainer.global_step}, and this run did not write it: not overwritten; resume from it, or "
                "run in another folder"
            )
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step
        log.info("step %d: wrote %s", trainer.global_step, self.path)

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether Lightning validates right after this batch (its own rule; private API, so guarded)."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(
                trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
            )
        except Exception:
            return False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # not a step boundary (gradient accumulation)
            return
        self._seen_step = step
        signum = self._stop_signal(trainer)
        if signum is not None:
            self._stop(trainer, signum)
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
        signum = self._stop_signal(trainer)
        if signum is not None:
            self._stop(trainer, signum)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps}


class ValidateLastStep(Callback):
    """Validation after the last training step, whatever `val_check_interval` is and however many stages came
    before: at the last step it sets `trainer.should_stop`, which Lightning answers with a validation. The
    last validation (and the best checkpoint) then covers the final weights."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.enable_validation and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class CrashCheckpoint(Callback):
    """`<dirpath>/<filename>.ckpt` after an unexpected exception in training (see the module docstring)."""

    # Exceptions after which no crash checkpoint is written: their state is already saved or is not worth
    # saving.
    SKIP = (
        TrainingInterrupted,
        SIGTERMException,
        NonFiniteLossError,
        CheckpointWriteError,
        KeyboardInterrupt,
        ConfigError,
    )

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
        candidates = [base.with_name(f"{base.name}.ckpt")] + [
            base.with_name(f"{base.name}-v{i}.ckpt") for i in range(1, 1000)
        ]
        for path in candidates:
            if path in self.written or not path.exists():
                return path
        raise CheckpointWriteError(f"no free name for a crash checkpoint in {self.dirpath}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if (
            self._start_step is None
            or isinstance(exception, self.SKIP)
            or trainer.global_step <= self._start_step
        ):
            return
        path = self._free_path()
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as err:  # never hide the exception that stopped training
            log.error("could not write the crash checkpoint %s: %s", path, err)
            return
        self.written.append(path)
        log.warning(
            "training failed at step %d: wrote %s (taken mid-step; resume from last.ckpt for an exact "
            "resume)",
            trainer.global_step,
            path,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}


class StopOnNonFiniteLoss(Callback):
    """Stops training with NonFiniteLossError as soon as a training loss, or a validation loss during fit, is
    NaN or infinite. It runs before the checkpoint callbacks (Lightning runs those last), so the state of a
    NaN validation is never saved, neither as last.ckpt nor as the best checkpoint."""

    @staticmethod
    def _kept(trainer: L.Trainer) -> str:
        latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
        if latest is not None and latest.saved_step is not None:
            return f"the last checkpoint is {latest.path} (step {latest.saved_step})"
        return "no checkpoint was written in this run"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        bad = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and v.numel() == 1 and not bool(torch.isfinite(v))
        }
        if bad:
            name, value = sorted(bad.items())[0]
            raise NonFiniteLossError(
                f"{name} is {value} at step {trainer.global_step}: training stopped and nothing was written "
                f"after it; {self._kept(trainer)}. Lower module.optimizer.lr or check the data"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        kept = self._kept(trainer)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        raise NonFiniteLossError(
            f"train/loss is {float(loss.detach().float().mean())} at step {trainer.global_step} (lr "
            f"{lr:.3g}): training stopped and nothing was written after it; {kept}. Lower "
            "module.optimizer.lr or check the data"
        )
