"""One run per folder (a lock held for the life of a run, stale locks taken over), nothing written into a
folder by a command line that fails its checks, and every output location checked before training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dfw import run_folder
from dfw.errors import ConfigError
from dfw.train import train
from tests.conftest import REPO, compose, run_module, tiny_overrides

QUICK = ["attention=linear", "trainer.max_steps=2", "test=false", "validate_before_fit=false"]


def _tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder`: size, modification time and contents."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another live run: a process that holds the folder's lock until it is killed."""
    code = (
        f"import sys, time\nfrom dfw import run_folder\nrun_folder.acquire({str(folder)!r})\n"
        "print('locked', flush=True)\ntime.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _an_earlier_run(folder: Path) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- attention=decay\n")
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (folder / "train.log").write_text("[the earlier run's log]\n")


def test_the_lock_is_exclusive_released_on_exit_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = _hold_lock(tmp_path)
    try:
        assert run_folder.holder(tmp_path)["pid"] == holder.pid
        with pytest.raises(
            run_folder.RunFolderBusy, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on "
        ):
            run_folder.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, the lock itself does not
        holder.wait()
    assert (tmp_path / run_folder.LOCK_FILE).is_file() and run_folder.holder(tmp_path) is None
    with caplog.at_level("INFO", logger="dfw.run_folder"), run_folder.locked([tmp_path]):
        assert run_folder.holder(tmp_path)["pid"] == os.getpid()
    assert any(
        f"took over the stale lock of {tmp_path}" in r.getMessage() and str(holder.pid) in r.getMessage()
        for r in caplog.records
    )
    assert run_folder.holder(tmp_path) is None  # released when the run ends


def test_a_run_in_a_folder_that_a_live_run_holds_refuses_before_writing(tmp_path, text_files):
    holder = _hold_lock(tmp_path / "run")
    try:
        before = _tree(tmp_path)
        with pytest.raises(ConfigError, match="is in use by another run"):
            train(compose(*tiny_overrides(tmp_path, text_files, *QUICK)))
        assert _tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_cli_one_run_per_folder_and_a_bad_command_line_writes_nothing_there(tmp_path, text_files):
    folder = tmp_path / "run"
    _an_earlier_run(folder)
    before = _tree(folder)
    # A command line that fails its checks, pointed at the existing run folder: one line, nothing written.
    bad = run_module(
        "dfw.train",
        *tiny_overrides(tmp_path, text_files, *QUICK, "attention.state_size=0"),
        f"hydra.run.dir={folder}",
    )
    output = bad.stdout + bad.stderr
    assert bad.returncode == 2 and "error: attention.state_size must be a positive integer" in output
    assert "Traceback" not in output and _tree(folder) == before
    # A second run while a live one holds the folder: one line, nothing written.
    holder = _hold_lock(folder)
    before = _tree(folder)  # with the holder's lock file
    try:
        busy = run_module(
            "dfw.train", *tiny_overrides(tmp_path, text_files, *QUICK), f"hydra.run.dir={folder}"
        )
    finally:
        holder.kill()
        holder.wait()
    output = busy.stdout + busy.stderr
    errors = [line for line in output.splitlines() if "error:" in line]
    assert busy.returncode == 2 and len(errors) == 1 and f"pid {holder.pid}" in errors[0], output[-2000:]
    assert "Traceback" not in output and _tree(folder) == before
    # Once it has ended (killed: its lock is stale), a good run takes the folder and writes Hydra's files.
    good = run_module("dfw.train", *tiny_overrides(tmp_path, text_files, *QUICK), f"hydra.run.dir={folder}")
    assert good.returncode == 0, good.stderr[-2000:]
    assert "attention=linear" in (folder / ".hydra" / "overrides.yaml").read_text()
    log = (folder / "train.log").read_text()
    assert (
        log.startswith("[the earlier run's log]\n")
        and "converted 2 of 2 layers to FastWeightAttention" in log
    )


@pytest.mark.slow
def test_cli_an_unwritable_run_folder_is_one_line(tmp_path, text_files):
    (tmp_path / "a-file").write_text("")
    done = run_module(
        "dfw.train",
        *tiny_overrides(tmp_path, text_files, *QUICK),
        f"hydra.run.dir={tmp_path / 'a-file' / 'run'}",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: hydra.run.dir={str(tmp_path / 'a-file' / 'run')!r}: {tmp_path / 'a-file'} is a file, not a "
        "folder; choose a writable folder"
    ]


@pytest.mark.parametrize(
    ("option", "where", "message"),
    [
        ("export_dir", "a-file/model", "is a file, not a folder"),
        ("export_dir", "someone-elses", "holds files that are not a model exported by dfw"),
        ("paths.output_dir", "a-file/run", "is a file, not a folder"),
        ("callbacks.last_checkpoint.dirpath", "a-file/checkpoints", "is a file, not a folder"),
    ],
)
def test_every_output_location_is_checked_before_training(tmp_path, text_files, option, where, message):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "someone-elses").mkdir()
    (tmp_path / "someone-elses" / "notes.txt").write_text("not a model")
    before = _tree(tmp_path)
    cfg = compose(*tiny_overrides(tmp_path, text_files, *QUICK, f"{option}={tmp_path / where}"))
    with pytest.raises(ConfigError, match=rf"^{option}='{tmp_path / where}'.*{message}"):
        train(cfg)
    assert _tree(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root may write into any folder; permissions cannot make one read-only"
)
def test_a_read_only_export_folder_is_refused_before_training(tmp_path, text_files):
    (tmp_path / "read-only").mkdir(mode=0o555)
    cfg = compose(
        *tiny_overrides(tmp_path, text_files, *QUICK, f"export_dir={tmp_path / 'read-only' / 'model'}")
    )
    with pytest.raises(ConfigError, match=r"cannot write into .*read-only \(permission denied\)"):
        train(cfg)
