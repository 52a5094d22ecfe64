"""The training entry point through the real Hydra config: runs, checkpoints, exact resume, bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dfw.errors import ConfigError
from dfw.model import load_exported
from dfw.train import train
from tests.conftest import CONF, REPO, compose, tiny_overrides

GROUPS = ["model", "attention", "data", "trainer", "logger", "callbacks", "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    assert _options(group), f"conf/{group}/ is empty"
    for option in _options(group):
        cfg = compose(f"{group}={option}", "paths.output_dir=/tmp/unused")
        assert cfg.model.name and cfg.attention.name and cfg.data.corpus
        if group == "attention":
            # The node builds a core for a layer of GPT-2's shapes.
            core = instantiate({k: v for k, v in cfg.attention.items() if k != "name"})(
                hidden_size=768, num_heads=12, head_dim=64, layer_idx=0, scaling=0.125
            )
            assert isinstance(core, torch.nn.Module)


def test_defaults_follow_the_paper():
    cfg = compose("paths.output_dir=/tmp/unused")
    assert (cfg.attention.name, cfg.model.name, cfg.data.corpus) == ("decay", "gpt2", "wikitext103")
    assert cfg.model.pretrained == "gpt2"


def _metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("attention", ["softmax", "decay"])
def test_short_training_run_logs_checkpoints_and_exports(tmp_path, text_files, attention):
    cfg = compose(*tiny_overrides(tmp_path, text_files, f"attention={attention}"))
    metrics = train(cfg)
    run = tmp_path / "run"
    for key in ("val/ppl_converted", "val/ppl", "test/ppl", "train/loss"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    # Fine-tuning must improve on the random initialisation on this repetitive corpus.
    assert metrics["val/ppl"] < metrics["val/ppl_converted"]
    rows = _metrics_csv(run)
    assert any(row.get("val/ppl") for row in rows) and any(row.get("train/loss") for row in rows)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    # The export rebuilds the same model without the training config.
    net = load_exported(run / "model").eval()
    assert type(net.transformer.h[0].attn.core).__name__ == {
        "softmax": "SoftmaxAttention",
        "decay": "FastWeightAttention",
    }[attention]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["attention"]["name"] == attention


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_is_exact(tmp_path, text_files):
    """4 steps in one go == 2 steps, then resume from last.ckpt to step 4 (weights, step, data order)."""
    common = ["attention=decay", "trainer.val_check_interval=2", "module.scheduler.num_training_steps=4", "test=false"]
    straight = compose(*tiny_overrides(tmp_path / "straight", text_files, *common, "trainer.max_steps=4"))
    train(straight)
    first = compose(*tiny_overrides(tmp_path / "interrupted", text_files, *common, "trainer.max_steps=2"))
    train(first)
    last = tmp_path / "interrupted" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    resumed = compose(*tiny_overrides(tmp_path / "resumed", text_files, *common, "trainer.max_steps=4", f"ckpt_path={last}"))
    train(resumed)
    # The resumed run keeps writing checkpoints beside the one it resumed from.
    resumed_last = tmp_path / "interrupted" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed_last, map_location="cpu", weights_only=True)["global_step"] == 4
    expected = _weights(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt")
    actual = _weights(resumed_last)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_resume_continues_the_same_wandb_run(tmp_path, text_files):
    common = ["attention=softmax", "logger=wandb", "logger.wandb.mode=offline", "test=false"]
    train(compose(*tiny_overrides(tmp_path / "a", text_files, *common, "trainer.max_steps=2", "trainer.val_check_interval=2")))
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, map_location="cpu", weights_only=True)["wandb_run_id"]
    resumed = compose(*tiny_overrides(tmp_path / "b", text_files, *common, "trainer.max_steps=4", f"ckpt_path={last}"))
    train(resumed)
    assert resumed.logger.wandb.id == run_id
    assert list((tmp_path / "b" / "run" / "wandb").glob(f"offline-run-*-{run_id}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attention.state_size=0", "attention.state_size must be a positive integer"),
        ("data.block_size=300", "data.block_size=300 is longer than the model's context"),
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        ("trainer.max_steps=-5", "`max_steps` must be a non-negative integer"),
        ("logger=wandb logger.wandb.mode=sometimes", "logger.wandb.mode must be online, offline, disabled or null"),
        ("data.files.validation=/nonexistent/valid.txt", "/nonexistent/valid.txt"),
        ("model=gpt2", "model.pretrained='gpt2': could not load it"),
        ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path='/nonexistent/last.ckpt' does not exist"),
    ],
)
def test_bad_input_raises_one_clear_error_before_writing_anything(tmp_path, text_files, override, message):
    cfg = compose(*tiny_overrides(tmp_path, text_files, "attention=decay", *override.split()))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "dfw.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, text_files):
    result = _cli(*tiny_overrides(tmp_path, text_files, "attention.state_size=-3"), f"hydra.run.dir={tmp_path}/hydra")
    assert result.returncode == 2
    assert "error: attention.state_size must be a positive integer" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    result = _cli("attention=no_such_attention", f"hydra.run.dir={tmp_path}/hydra")
    assert result.returncode != 0
    assert "Could not find 'attention/no_such_attention'" in result.stderr
    assert "Traceback" not in result.stderr
