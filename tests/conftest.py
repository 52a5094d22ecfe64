"""Shared fixtures: the real Hydra config, shrunk to a tiny CPU run; tiny checkpoints written here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Tests never touch the network: no hub retries, W&B writes to disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU the Triton kernel (kernel=triton) runs in Triton's interpreter, which must be switched
# on before anything imports triton (tests/kernels/test_triton.py). Nothing else here uses Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def compose(*overrides: str):
    """The `train` config exactly as `python -m dfw.train <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import dfw  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """A small English corpus as the user's own files (data=text): train / validation / test."""
    root = tmp_path_factory.mktemp("corpus")
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "A journey of a thousand miles begins with a single step.",
        "To be, or not to be, that is the question.",
        "All that glitters is not gold; often have you heard that told.",
        "The rain in Spain stays mainly in the plain.",
    ]
    files = {}
    for i, split in enumerate(["train", "validation", "test"]):
        lines = [sentences[(j + i) % len(sentences)] for j in range(400 if split == "train" else 60)]
        files[split] = root / f"{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def tiny_overrides(tmp_path: Path, text_files: dict[str, Path], *extra: str) -> list[str]:
    """A few CPU steps of the real pipeline on data=text with a tiny random GPT-2."""
    return [
        "model=tiny",
        "data=text",
        f"data.files.train={text_files['train']}",
        f"data.files.validation={text_files['validation']}",
        f"data.files.test={text_files['test']}",
        "data.block_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        f"paths.output_dir={tmp_path / 'run'}",
        "logger=csv",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "module.scheduler.num_warmup_steps=1",
        *extra,
    ]
