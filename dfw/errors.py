"""The one exception type for bad input, and how entry points report it: one line, exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A setting, file or resource the user named is wrong or missing; the message says what to do."""


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`, also when a library (Hydra's instantiate) wrapped it."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


def run_or_exit(fn: Callable[..., Any], *args: Any, logger: logging.Logger) -> Any:
    """Run an entry point; a ConfigError anywhere inside becomes one `error: ...` line and exit code 2."""
    try:
        return fn(*args)
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:
            raise
        logger.error("error: %s", config_error)
        if in_multirun():
            # Hydra records this job as failed and runs the sweep's other jobs; an exit would end them all.
            raise config_error from None
        sys.exit(2)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
