"""The one exception type for bad input, and how it reaches the user: one line, exit code 2.

Options are checked where their object is built, and objects are built from configs through
`instantiate` here, which gives back the ConfigError that Hydra wraps; entry points run through
`run_or_exit`, which prints it as `error: ...`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting, file or resource the user named is wrong or missing; the message says what to do."""


def error_summary(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, raising a ConfigError of the target (or of a nested node) as itself.

    Hydra wraps whatever a target raises in an InstantiationException with its own multi-line message;
    the ConfigError it wraps is the one line the user needs. Lightning's MisconfigurationException (a bad
    Trainer or callback option; its message names the option) becomes a ConfigError too. Every config
    node in dfw is built here.
    """
    from hydra.utils import instantiate as hydra_instantiate
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return hydra_instantiate(node, *args, **kwargs)
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError | MisconfigurationException):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        if isinstance(cause, MisconfigurationException):
            target = node.get("_target_", "the config") if hasattr(node, "get") else "the config"
            raise ConfigError(f"{target}: {' '.join(str(cause).split())}") from None
        raise cause from None


def run_or_exit(fn: Callable[..., Any], *args: Any, logger: logging.Logger) -> Any:
    """Run an entry point; a ConfigError becomes one `error: ...` line and exit code 2."""
    try:
        return fn(*args)
    except ConfigError as err:
        logger.error("error: %s", err)
        if in_multirun():
            # Hydra records this job as failed and runs the sweep's other jobs; an exit would end them all.
            raise
        sys.exit(2)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_config_choices(config_dir: Path, arguments: Sequence[str]) -> None:
    """Every `group=option` of a command line names a file `<group>/<option>.yaml` in `config_dir` or in a
    `--config-dir` (`-cd`) the command line adds; else one `error:` line and exit code 2, before Hydra (whose
    message for it is many lines, with exit code 1). Hydra's own groups (hydra/...), anything that is not a
    plain choice, and command lines that replace the config path or the search path are left to Hydra."""
    arguments = list(arguments)
    folders = [Path(config_dir)]
    for i, argument in enumerate(arguments):
        if argument.startswith(("--config-path", "-cp", "hydra.searchpath", "+hydra.searchpath")):
            return
        if argument in ("--config-dir", "-cd") and i + 1 < len(arguments):
            folders.append(Path(arguments[i + 1]).expanduser())
        elif argument.startswith("--config-dir="):
            folders.append(Path(argument.partition("=")[2]).expanduser())
    for argument in arguments:
        if argument.startswith(("-", "~")) or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        key = key.lstrip("+")
        groups = [folder / key for folder in folders if (folder / key).is_dir()]
        if key.startswith("hydra") or not key or not groups or any(c in value for c in "()[]{}$*?'\""):
            continue
        options = sorted({p.stem for group in groups for p in group.glob("*.yaml")})
        for option in value.split(","):  # a multirun sweeps a comma-separated list
            if option not in ("null", "") and option not in options:
                print(
                    f"error: {key}={option} is not an option of {key}; use one of {', '.join(options)} "
                    f"(conf/{key}/)",
                    file=sys.stderr,
                )
                sys.exit(2)
