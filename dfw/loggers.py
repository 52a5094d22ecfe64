"""W&B that never hangs start-up: online with credentials, offline (to disk) otherwise."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from .errors import ConfigError

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (as `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(
    project: str,
    save_dir: str,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    id: str | None = None,
    mode: str | None = None,
) -> WandbLogger:
    """A WandbLogger whose mode is `mode`, else $WANDB_MODE, else online iff credentials exist.

    `id` resumes an earlier run (train.py passes the id stored in the checkpoint on `ckpt_path=...`).
    """
    import wandb

    if mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(
            f"logger.wandb.mode must be online, offline, disabled or null (by credentials), got {mode!r}"
        )
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags or []),
        id=id,
        resume="allow" if id else None,
        mode=mode,
        settings=wandb.Settings(init_timeout=30, silent=True),
    )
    if mode == "offline":
        log.info(
            "W&B is offline (no credentials, or WANDB_MODE=offline): the run is written under %s/wandb; "
            "upload it later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
            save_dir,
        )
    return logger
