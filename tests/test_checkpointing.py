"""Checkpoints keep their promise: last.ckpt is the latest state, writes are atomic, a kill -9 or a Ctrl-C
resumes bit-identical, failed resumes and crashes never destroy a checkpoint, a NaN loss stops the run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfw.checkpointing import (
    CheckpointWriteError,
    LatestCheckpoint,
    NonFiniteLossError,
    TrainingInterrupted,
    atomic_torch_save,
    load_checkpoint,
)
from dfw.errors import ConfigError, run_or_exit
from dfw.model import load_exported
from dfw.train import train
from tests.conftest import REPO, compose, tiny_overrides

STEPS = 8
# Validation (and last.ckpt) every 2 steps. lr 0.3 makes the tiny model's val/ppl rise after step 2, so the
# best checkpoint stays at step 2 while training goes on: last.ckpt must not follow it back.
COMMON = [
    "trainer.val_check_interval=2",
    f"module.scheduler.num_training_steps={STEPS}",
    "module.optimizer.lr=0.3",
    "validate_before_fit=false",
    "test=false",
    "export_dir=null",
]


def _cfg(root: Path, text_files, *extra: str, attention: str = "decay"):
    return compose(
        *tiny_overrides(
            root, text_files, f"attention={attention}", *COMMON, f"trainer.max_steps={STEPS}", *extra
        )
    )


def _cli(
    root: Path, text_files, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(
        root, text_files, "attention=decay", *COMMON, f"trainer.max_steps={STEPS}", *extra
    )
    # The same intra-op thread count as the in-process runs it is compared with (one per pytest-xdist
    # worker): float reductions split differently over threads, and the comparison is bit for bit.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "dfw.train", *overrides, f"hydra.run.dir={root}/hydra"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(actual: Path, expected: Path) -> None:
    a, b = _load(actual)["state_dict"], _load(expected)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_files) -> Path:
    """An uninterrupted 8-step run; its checkpoint folder."""
    root = tmp_path_factory.mktemp("straight")
    train(_cfg(root, text_files, f"export_dir={root / 'model'}", "export_weights=best"))
    return root / "run" / "checkpoints"


def test_an_uninterrupted_run_leaves_last_best_and_nothing_else(straight):
    assert _load(straight / "last.ckpt")["global_step"] == STEPS
    assert len(list(straight.glob("best-step*.ckpt"))) == 1
    assert not list(straight.glob("on-exception*")) and not list(straight.glob(".*.tmp"))


def test_the_export_says_which_weights_it_holds(straight):
    best = _load(next(straight.glob("best-step*.ckpt")))
    config = json.loads((straight.parent.parent / "model" / "config.json").read_text())
    assert (config["exported_weights"], config["exported_step"]) == ("best", best["global_step"])
    exported = load_exported(straight.parent.parent / "model").state_dict()
    for key, value in best["state_dict"].items():
        assert torch.equal(exported[key.removeprefix("net.")], value), key


@pytest.mark.slow
def test_kill_9_between_checkpoints_resumes_bit_identical_from_last_ckpt(tmp_path, text_files, straight):
    killed = _cli(
        tmp_path,
        text_files,
        "+callbacks.kill._target_=tests.checkpoint_faults.KillAtStep",
        "+callbacks.kill.step=5",
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _load(checkpoints / "last.ckpt")["global_step"] == 4  # written at step 4, killed during step 5
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-step2.ckpt"]  # val/ppl rose at step 4
    assert not list(checkpoints.glob(".*.tmp"))
    train(_cfg(tmp_path / "resumed", text_files, f"ckpt_path={checkpoints / 'last.ckpt'}"))
    assert _load(checkpoints / "last.ckpt")["global_step"] == STEPS
    _assert_same_weights(checkpoints / "last.ckpt", straight / "last.ckpt")


@pytest.mark.slow
def test_ctrl_c_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, text_files, straight):
    # A Ctrl-C during step 3 (mid-step, not a checkpoint step): the run finishes step 3 and writes it.
    stopped = _cli(
        tmp_path,
        text_files,
        "+callbacks.ctrl_c._target_=tests.checkpoint_faults.CtrlCAtStep",
        "+callbacks.ctrl_c.step=3",
    )
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    output = stopped.stdout + stopped.stderr
    assert "interrupted (Ctrl-C) at step 3" in output and "Traceback" not in output
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = _load(last)
    assert state["global_step"] == 3
    assert state["lr_schedulers"][0]["last_epoch"] == 3  # the scheduler stepped with the optimizer
    assert not list(last.parent.glob("on-exception*"))
    train(_cfg(tmp_path / "resumed", text_files, f"ckpt_path={last}"))
    _assert_same_weights(last, straight / "last.ckpt")


def _fake_slurm(tmp_path: Path, restarts: int = 0) -> dict[str, str]:
    """The environment of a SLURM job step (Lightning detects SLURMEnvironment from it), with an `scontrol` on
    PATH that records its arguments instead of talking to a scheduler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "dfw-test",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_RESTART_COUNT": str(restarts),
    }


@pytest.mark.slow
def test_sigterm_stops_at_the_step_boundary_exits_143_and_resumes_exactly(tmp_path, text_files, straight):
    # What a scheduler sends before preempting a job, during step 3 (not a checkpoint step).
    stopped = _cli(
        tmp_path,
        text_files,
        "+callbacks.term._target_=tests.checkpoint_faults.SignalAtStep",
        "+callbacks.term.step=3",
    )
    assert stopped.returncode == 143, stopped.stderr[-2000:]  # 128 + SIGTERM: the scheduler sees a failed job
    output = stopped.stdout + stopped.stderr
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (
        f"interrupted (SIGTERM) at step 3; the state at that step is in {last}; resume with ckpt_path={last}"
        in output
    )
    assert "Traceback" not in output
    assert _load(last)["global_step"] == 3 and not list(last.parent.glob("on-exception*"))
    train(_cfg(tmp_path / "resumed", text_files, f"ckpt_path={last}"))
    _assert_same_weights(last, straight / "last.ckpt")


@pytest.mark.slow
def test_sigterm_during_a_validation_writes_the_state_there_and_resumes_exactly(
    tmp_path, text_files, straight
):
    cfg = _cfg(
        tmp_path,
        text_files,
        "+callbacks.term._target_=tests.checkpoint_faults.SignalAtValidation",
        "+callbacks.term.step=2",
    )
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg)
    assert (stop.value.signum, stop.value.step, stop.value.exit_code) == (signal.SIGTERM, 2, 143)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 2 and not list(last.parent.glob("on-exception*"))
    train(_cfg(tmp_path / "resumed", text_files, f"ckpt_path={last}"))
    _assert_same_weights(last, straight / "last.ckpt")


@pytest.mark.slow
def test_under_slurm_the_requeue_signal_requeues_the_job_which_resumes_exactly(
    tmp_path, text_files, straight
):
    slurm = _fake_slurm(tmp_path)
    fault = [
        "+callbacks.usr1._target_=tests.checkpoint_faults.SignalAtStep",
        "+callbacks.usr1.step=3",
        "+callbacks.usr1.name=SIGUSR1",
    ]
    stopped = _cli(tmp_path, text_files, *fault, env=slurm)
    assert stopped.returncode == 138, stopped.stderr[-2000:]  # 128 + SIGUSR1
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert _load(last)["global_step"] == 3
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in stopped.stdout + stopped.stderr
    # SLURM starts the job again with the same command line: it resumes from its own last.ckpt.
    again = _cli(tmp_path, text_files, env=_fake_slurm(tmp_path, restarts=1))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {last}" in again.stdout + again.stderr
    _assert_same_weights(last, straight / "last.ckpt")


def test_the_slurm_launcher_sends_the_signal_that_runs_stop_and_requeue_on():
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from omegaconf import OmegaConf

    launcher = OmegaConf.load(REPO / "conf" / "hydra" / "launcher" / "slurm.yaml")
    name, _, seconds = launcher.additional_parameters.signal.partition("@")
    assert int(seconds) == launcher.signal_delay_s > 0
    assert f"SIG{name}" in compose("paths.output_dir=/tmp/unused").callbacks.last_checkpoint.stop_signals
    assert SLURMEnvironment().requeue_signal == getattr(signal, f"SIG{name}")  # Lightning's requeue signal
    assert launcher.additional_parameters.requeue is True and launcher.max_num_timeout == 0


def test_stop_signals_are_checked_when_the_callback_is_built(tmp_path):
    with pytest.raises(
        ConfigError, match="callbacks.last_checkpoint.stop_signals: 'SIGNOPE' is not a signal"
    ):
        LatestCheckpoint(str(tmp_path), every_n_steps=2, stop_signals=["SIGTERM", "SIGNOPE"])


def test_ctrl_c_in_process_raises_training_interrupted(tmp_path, text_files):
    cfg = _cfg(
        tmp_path,
        text_files,
        "trainer.max_steps=4",
        "+callbacks.ctrl_c._target_=tests.checkpoint_faults.CtrlCAtStep",
        "+callbacks.ctrl_c.step=1",
    )
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg)
    assert stop.value.step == 1 and _load(Path(stop.value.path))["global_step"] == 1


def test_a_write_failure_halfway_through_a_checkpoint_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_disk_full(obj, f):
        real_save(obj, f)
        f.seek(len(before) // 2)
        f.truncate()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(CheckpointWriteError, match=f"^no space left writing {path}"):
        atomic_torch_save({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_real_full_disk_error_is_one_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """The kernel's own ENOSPC, through torch's zip writer (which wraps it in a RuntimeError)."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    def onto_a_full_device(fd, mode="r", *args, **kwargs):
        os.close(fd)  # the temporary file stays empty; every byte goes to /dev/full instead
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", onto_a_full_device)
    with pytest.raises(CheckpointWriteError, match=f"^no space left writing {path}"):
        atomic_torch_save({"global_step": 2, "w": torch.zeros(100_000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_last_ckpt_is_the_latest_state_and_a_full_disk_keeps_it(tmp_path, text_files, monkeypatch, caplog):
    real_save = torch.save

    def disk_full_at_step_6(obj, f):
        if isinstance(obj, dict) and obj.get("global_step") == 6:
            real_save({"partial": torch.zeros(10)}, f)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_step_6)
    cfg = _cfg(tmp_path, text_files, "trainer.max_steps=6")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run_or_exit(train, cfg, logger=logging.getLogger("dfw.train"))
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left writing "), errors
    checkpoints = tmp_path / "run" / "checkpoints"
    # last.ckpt is the latest state written (step 4), not the best (step 2: val/ppl rose at step 4), and
    # intact.
    assert _load(checkpoints / "last.ckpt")["global_step"] == 4
    assert [p.name for p in checkpoints.glob("best-*.ckpt")] == ["best-step2.ckpt"]
    assert not list(checkpoints.glob("on-exception*")) and not list(checkpoints.glob(".*.tmp"))


def test_a_crash_writes_its_checkpoint_without_replacing_one_it_did_not_write(tmp_path, text_files):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "on-exception.ckpt").write_bytes(b"someone else's")
    cfg = _cfg(
        tmp_path,
        text_files,
        "trainer.max_steps=4",
        "+callbacks.fail._target_=tests.checkpoint_faults.FailAtStep",
        "+callbacks.fail.step=3",
    )
    with pytest.raises(RuntimeError, match="injected failure"):
        train(cfg)
    assert (checkpoints / "on-exception.ckpt").read_bytes() == b"someone else's"
    assert _load(checkpoints / "on-exception-v1.ckpt")["global_step"] == 2  # failed during step 3
    assert _load(checkpoints / "last.ckpt")["global_step"] == 2


def test_failed_or_finished_resumes_write_and_delete_nothing(tmp_path, text_files, straight):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(straight, checkpoints)
    (checkpoints / "on-exception.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes())
    before = _listing(checkpoints)
    last = checkpoints / "on-exception.ckpt"
    cases = [
        ("softmax", "", r"other attention options \(attention.name: checkpoint 'decay', requested 'softmax'"),
        ("decay", "attention.state_size=32", "attention.state_size: checkpoint None, requested 32"),
        ("decay", "model.config.n_layer=3", r"another model \(model.n_layer: checkpoint 2, requested 3\)"),
        (
            "decay",
            f"trainer.max_steps={STEPS}",
            f"already at step {STEPS} and trainer.max_steps={STEPS}: nothing left to train",
        ),
    ]
    for attention, override, message in cases:
        extra = [f"ckpt_path={last}", "trainer.max_steps=12", *([override] if override else [])]
        with pytest.raises(ConfigError, match=message):
            train(_cfg(tmp_path / "again", text_files, *extra, attention=attention))
        assert _listing(checkpoints) == before, (attention, override)


@pytest.mark.parametrize(
    ("override", "message"), [("trainer.max_steps=-5", "trainer.max_steps must be a positive integer")]
)
def test_bad_trainer_options_are_one_error(tmp_path, text_files, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose(*tiny_overrides(tmp_path, text_files, override)))
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, text_files, caplog):
    cfg = _cfg(
        tmp_path,
        text_files,
        "trainer.max_steps=4",
        "module.optimizer.lr=1e6",
        f"export_dir={tmp_path / 'model'}",
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run_or_exit(train, cfg, logger=logging.getLogger("dfw.train"))
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert len(errors) == 1 and "loss is nan" in errors[0], errors
    assert not (tmp_path / "model").exists()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob("on-exception*"))
    for path in checkpoints.glob("*.ckpt"):  # whatever was written holds finite weights
        assert all(torch.isfinite(w).all() for w in _load(path)["state_dict"].values()), path
    assert isinstance(NonFiniteLossError("x"), ConfigError)


def test_a_nan_validation_stops_the_run_and_is_never_the_best_checkpoint(tmp_path, text_files, caplog):
    cfg = _cfg(
        tmp_path,
        text_files,
        "trainer.max_steps=4",
        "+callbacks.nan._target_=tests.checkpoint_faults.NaNValidationAtStep",
        "+callbacks.nan.step=2",
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        run_or_exit(train, cfg, logger=logging.getLogger("dfw.train"))
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    assert (
        len(errors) == 1
        and "val/loss is nan at step 2" in errors[0]
        and "no checkpoint was written" in errors[0]
    ), errors
    assert not list(
        (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    )  # neither best-step2.ckpt nor last.ckpt


def test_resuming_an_older_checkpoint_never_overwrites_a_later_one(tmp_path, text_files, straight, caplog):
    # A folder whose last.ckpt is at step 8, resumed from its step-2 checkpoint with trainer.max_steps=4.
    train(_cfg(tmp_path / "old", text_files, "trainer.max_steps=2"))
    checkpoints = tmp_path / "old" / "run" / "checkpoints"
    older = checkpoints / "step2.ckpt"
    (checkpoints / "last.ckpt").rename(older)
    shutil.copy(straight / "last.ckpt", checkpoints / "last.ckpt")
    before = _listing(checkpoints)
    # This run's own folder is elsewhere: it continues there and says so.
    with caplog.at_level(logging.WARNING):
        train(_cfg(tmp_path / "new", text_files, f"ckpt_path={older}", "trainer.max_steps=4"))
    assert _listing(checkpoints) == before
    assert _load(tmp_path / "new" / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert any("holds a later state (step 8)" in r.getMessage() for r in caplog.records)
    # Its own folder is the resumed checkpoint's: refused, nothing written.
    with pytest.raises(ConfigError, match=r"is at step 2, but .*last.ckpt holds a later state \(step 8\)"):
        train(_cfg(tmp_path / "old", text_files, f"ckpt_path={older}", "trainer.max_steps=4"))
    assert _listing(checkpoints) == before
    # A new run (no ckpt_path) in a folder that holds a run's latest state: refused too.
    with pytest.raises(ConfigError, match=r"last.ckpt exists \(step 8\) from an earlier run in this folder"):
        train(_cfg(tmp_path / "old", text_files))
    assert _listing(checkpoints) == before


def _changed_train_file(tmp_path: Path, text_files) -> Path:
    changed = tmp_path / "train-changed.txt"
    changed.write_text(text_files["train"].read_text().replace("fox", "cat"))
    return changed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.block_size=16", "data.block_size: checkpoint 32, requested 16"),
        ("data.batch_size=2", "data.batch_size: checkpoint 4, requested 2"),
        ("seed=7", "data.seed: checkpoint 1234, requested 7"),
        ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches: checkpoint 1, requested 2"),
        ("CHANGED", "the train split's text is not the checkpoint's"),
    ],
)
def test_a_resume_on_other_data_refuses_naming_what_changed(
    tmp_path, text_files, straight, override, message
):
    checkpoints = tmp_path / "old"
    shutil.copytree(straight, checkpoints)
    before = _listing(checkpoints)
    if override == "CHANGED":
        override = f"data.files.train={_changed_train_file(tmp_path, text_files)}"
    with pytest.raises(ConfigError, match=message + ".*resume.allow_data_change=true"):
        train(
            _cfg(
                tmp_path,
                text_files,
                f"ckpt_path={checkpoints / 'last.ckpt'}",
                "trainer.max_steps=10",
                override,
            )
        )
    assert _listing(checkpoints) == before


def test_resume_allow_data_change_continues_and_says_so(tmp_path, text_files, straight, caplog):
    checkpoints = tmp_path / "old"
    shutil.copytree(straight, checkpoints)
    changed = f"data.files.train={_changed_train_file(tmp_path, text_files)}"
    with caplog.at_level(logging.WARNING):
        train(
            _cfg(
                tmp_path,
                text_files,
                f"ckpt_path={checkpoints / 'last.ckpt'}",
                "trainer.max_steps=9",
                changed,
                "resume.allow_data_change=true",
            )
        )
    assert _load(checkpoints / "last.ckpt")["global_step"] == 9
    assert any(
        "resume.allow_data_change=true: resuming" in r.getMessage() and "train split" in r.getMessage()
        for r in caplog.records
    )


def test_a_random_bytes_checkpoint_is_not_called_pickled_objects(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match="it is not a checkpoint file") as error:
        load_checkpoint(path, "ckpt_path")
    assert "pickled" not in str(error.value)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_torch_save({"global_step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode
