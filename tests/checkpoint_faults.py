"""Faults injected into a real training run (added as
`+callbacks.<name>._target_=tests.checkpoint_faults.<Class>`).

Each fires during the optimizer step that takes the run from `step - 1` to `step` (before the update), so
the fault lands mid-step, between checkpoints.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class _AtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == self.step - 1:
            self.fire()

    def fire(self) -> None:
        raise NotImplementedError


class KillAtStep(_AtStep):
    """kill -9 of the training process itself: no Python cleanup, no exception hook runs."""

    def fire(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class CtrlCAtStep(_AtStep):
    """A Ctrl-C (SIGINT to the process), as a terminal sends it."""

    def fire(self) -> None:
        signal.raise_signal(signal.SIGINT)


class FailAtStep(_AtStep):
    """A crash of the training code (a bug, an out-of-memory error)."""

    def fire(self) -> None:
        raise RuntimeError("injected failure")


class SignalAtStep(_AtStep):
    """A signal sent to the process by name (SIGTERM from a scheduler, SIGUSR1 before a SLURM time limit)."""

    def __init__(self, step: int, name: str = "SIGTERM"):
        super().__init__(step)
        self.signum = getattr(signal, name)

    def fire(self) -> None:
        signal.raise_signal(self.signum)


class NaNValidationAtStep(Callback):
    """The validation after `step` computes NaN logits (a model whose evaluation diverged; training is
    finite)."""

    def __init__(self, step: int):
        self.step, self.hook = step, None

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and trainer.global_step == self.step:
            self.hook = pl_module.net.lm_head.register_forward_hook(
                lambda module, args, out: out * float("nan")
            )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


class SignalAtValidation(Callback):
    """A signal during the validation after `step` (after its first batch, so Lightning stops it there)."""

    def __init__(self, step: int, name: str = "SIGTERM"):
        self.step, self.signum = step, getattr(signal, name)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if (
            trainer.state.fn == "fit"
            and trainer.global_step == self.step
            and not getattr(self, "fired", False)
        ):
            self.fired = True
            signal.raise_signal(self.signum)
