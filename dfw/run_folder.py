"""One run per folder, and nothing written into a folder before the command line is known to be good.

- `locked(folders)`: an exclusive lock on each output folder (the run folder, a checkpoint folder elsewhere)
  for the life of a run: `flock` on `<folder>/.dfw-run.lock`, which the kernel releases on any exit of the
  process (an exception, Ctrl-C, `kill -9`), so a lock left by a killed run is stale by construction: the
  next run takes it over and logs whose it was. The file names its holder (pid, host, start time, command)
  for the one-line refusal of a second run. Works on local disks and on NFS (Linux maps `flock` to NFS
  locks); on a file system without locks the run refuses to start rather than run unguarded.
- `RunFolderCallback` (a Hydra callback, `conf/hydra/default.yaml`): before Hydra writes anything into the
  run folder of a single run, refuses a folder that another live run holds, and holds back what Hydra would
  write there (`.hydra/*.yaml` and the log file) until `dfw.train` has checked the command line and calls
  `write_held_back()`. A command line that fails its checks then leaves an existing run folder as it was.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".dfw-run.lock"
_held: dict[Path, int] = {}  # folder -> file descriptor of its lock, for the locks this process holds
_held_back: dict[str, Any] = {}  # what Hydra would have written into the run folder, until write_held_back()


class RunFolderBusy(ConfigError):
    """Another live run holds the lock of an output folder."""


def _describe(info: dict[str, Any]) -> str:
    started = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    )
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}"


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def secondary_process() -> bool:
    """Whether this is a process of a multi-process run other than its first (rank 0 of node 0), by the
    environment variables Lightning reads its rank from (RANK, LOCAL_RANK, SLURM_PROCID, JSM_NAMESPACE_RANK)
    and NODE_RANK / GROUP_RANK. The first process holds the locks and writes Hydra's files for all of them."""
    rank = next(
        (
            os.environ[k]
            for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
            if k in os.environ
        ),
        "0",
    )
    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return int(rank or 0) > 0 or int(node or 0) > 0


def acquire(folder: str | Path) -> bool:
    """Take the lock of `folder` (created if missing); False when this process holds it already."""
    folder = Path(folder).expanduser().absolute()
    if folder in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        info = _read_info(fd)
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunFolderBusy(
                f"{folder} is in use by another run ({_describe(info)}): wait for it to end, or write this "
                "run elsewhere (hydra.run.dir=<new folder> or paths.output_dir=<new folder>)"
            ) from None
        raise ConfigError(
            f"cannot lock {folder / LOCK_FILE} ({err.strerror}); run in a folder on a file system with locks"
        ) from None
    previous = _read_info(fd)
    if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (
        os.getpid(),
        socket.gethostname(),
    ):
        log.info("took over the stale lock of %s: that run has ended (%s)", folder, _describe(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    _held[folder] = fd
    return True


def release(folder: str | Path) -> None:
    fd = _held.pop(Path(folder).expanduser().absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def locked(folders: Iterable[str | Path]) -> Iterator[None]:
    """Hold the lock of every folder for the duration; releases the ones it took, however it ends. The
    other processes of a multi-process run (`secondary_process`) take none: the first holds them."""
    taken: list[Path] = []
    try:
        for folder in (
            [] if secondary_process() else sorted({Path(f).expanduser().absolute() for f in folders})
        ):
            if acquire(folder):
                taken.append(folder)
        yield
    finally:
        for folder in taken:
            release(folder)


def holder(folder: str | Path) -> dict[str, Any] | None:
    """Who holds the lock of `folder` now (pid, host, started, command), or None when no live run does."""
    path = Path(folder) / LOCK_FILE
    if Path(folder).absolute() in _held:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_info(fd) or {"pid": None}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def write_held_back() -> None:
    """Write what RunFolderCallback held back (Hydra's `.hydra/*.yaml`, and its log file, whose lines so far
    are in a temporary file), once."""
    if not _held_back:
        return
    from hydra.core.hydra_config import HydraConfig

    held, hydra_cfg = dict(_held_back), HydraConfig.get()
    _held_back.clear()
    if held["output_subdir"] is not None:  # what Hydra's run_job writes there, as it writes it
        output = Path(hydra_cfg.runtime.output_dir) / held["output_subdir"]
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(OmegaConf.to_yaml(held["task_config"]))
        (output / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
        (output / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.overrides.task))
    # The log so far went to a temporary file outside the run folder: it moves in, and logging follows it.
    root = logging.getLogger()
    for name, temporary in held["log_files"].items():
        node = OmegaConf.create(
            {"hydra": OmegaConf.to_container(hydra_cfg, resolve=False), "file": held["log_names"][name]}
        )
        real = Path(str(node.file))
        for handler in [
            h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == temporary
        ]:
            handler.flush()
            moved = logging.FileHandler(real, mode="a", encoding=handler.encoding)
            moved.setFormatter(handler.formatter)
            moved.setLevel(handler.level)
            handler.close()
            with open(real, "ab") as out:
                out.write(Path(temporary).read_bytes())
            root.removeHandler(handler)
            root.addHandler(moved)
        Path(temporary).unlink(missing_ok=True)


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)  # Hydra has not configured logging yet
    sys.exit(2)


class RunFolderCallback(Callback):
    """The Hydra side of one run per folder (see the module docstring); single runs only (a multirun's jobs
    each get a folder of their own, locked by `dfw.train`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if secondary_process():  # another rank of a run that the first process has checked and locked
            return
        run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
        problem = unwritable(run_dir)
        if problem:
            _exit_with(f"hydra.run.dir={str(run_dir)!r}: {problem}; choose a writable folder")
        if run_dir.is_dir():
            busy = holder(run_dir)
            if busy is not None:
                _exit_with(
                    f"{run_dir} is in use by another run ({_describe(busy)}): wait for it to end, or write "
                    "this run elsewhere (hydra.run.dir=<new folder>)"
                )
        with read_write(config.hydra), open_dict(config.hydra):
            if config.hydra.output_subdir is not None:
                task_config = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
                _held_back.update(output_subdir=str(config.hydra.output_subdir), task_config=task_config)
                config.hydra.output_subdir = None
            # Log files (Hydra's `<job>.log`) start in a temporary file outside the run folder.
            handlers = (config.hydra.job_logging.get("handlers") if config.hydra.job_logging else None) or {}
            _held_back.setdefault("output_subdir", None)
            _held_back.setdefault(
                "task_config", OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            )
            _held_back.update(log_files={}, log_names={})
            for name, handler in handlers.items():
                if handler is not None and "filename" in handler:
                    fd, temporary = tempfile.mkstemp(prefix=f"dfw-{os.getpid()}-", suffix=".log")
                    os.close(fd)
                    atexit.register(Path(temporary).unlink, missing_ok=True)
                    _held_back["log_names"][name] = OmegaConf.to_container(handlers, resolve=False)[name][
                        "filename"
                    ]
                    _held_back["log_files"][name] = temporary
                    handler.filename = temporary


def unwritable(path: str | Path) -> str | None:
    """Why nothing can be written at `path` (a folder, existing or to be created), or None. Writes nothing:
    the nearest existing folder must be a directory this process may write into (`access`, which also
    knows read-only file systems)."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_mount(existing) else "permission denied"
        return f"cannot write into {existing} ({reason})"
    return None


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
