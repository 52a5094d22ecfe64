"""Shared fixtures and helpers: the real Hydra config shrunk to a tiny CPU run, tiny GPT-2 checkpoints,
and one trained run for the tests that only need a trained run (its checkpoint, export or metrics).

Nothing here writes outside pytest's temporary directories: runs, token caches and tokenizers go under
the session's `text_files` folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Tests never touch the network: no hub retries, W&B writes to disk.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
# `make test` runs two pytest-xdist workers on this 2-core machine: one thread each (else two).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))
# Without a GPU the Triton kernel (kernel=triton) runs in Triton's interpreter, which must be switched
# on before anything imports triton (tests/kernels/test_triton.py). Nothing else here uses Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fixtures worth building once: under pytest-xdist (`-n 2 --dist loadgroup`, as `make test` runs), every
# test that uses one of them runs in the same worker.
SHARED_FIXTURE_GROUPS = {
    "trained_run": "trained_run",
    "resumed_run": "trained_run",
    "multirun": "multirun",
    "compiled": "nvcc",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        groups = {SHARED_FIXTURE_GROUPS[name] for name in item.fixturenames if name in SHARED_FIXTURE_GROUPS}
        if groups:
            assert len(groups) == 1, f"{item.nodeid} uses fixtures of two xdist groups: {groups}"
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


def compose(*overrides: str):
    """The `train` config exactly as `python -m dfw.train <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import dfw  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, offline, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- Tiny models --------------------------------------------------------------------------------------------

GPT2_VOCAB = 50257  # data=text uses GPT-2's tokenizer (model.tokenizer=gpt2)


def save_tiny_gpt2(path: Path, vocab_size: int = 97, **config: Any):
    """A tiny random GPT-2 (2 layers, 2 heads of 16, 64 positions; seed 0) written with `save_pretrained`,
    as a pretrained checkpoint is: `build_model` and `model.pretrained=<path>` load it for real."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    options = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, bos_token_id=0, eos_token_id=0) | config
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **options)).eval()
    model.save_pretrained(path)
    return model


class VocabTokenizer:
    """What `build_model` asks of a tokenizer: its size and its end-of-sequence id."""

    eos_token_id = 0

    def __init__(self, size: int = 97) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


# --- A tiny run of the real pipeline ------------------------------------------------------------------------


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
    """A few CPU steps of the real pipeline on data=text with a tiny random GPT-2, writing into
    `tmp_path / "run"`; the token cache is shared by the session (next to the corpus)."""
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
        f"paths.cache_dir={text_files['train'].parent / 'cache'}",
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


@dataclass(frozen=True)
class TrainedRun:
    """A finished `dfw.train` run: what it was given, where it wrote, what it returned."""

    overrides: list[str]  # its command line (tiny_overrides + TRAINED_RUN)
    cfg: Any  # the composed config it ran with
    dir: Path  # paths.output_dir: csv/, checkpoints/ (last.ckpt, best-*.ckpt), model/ (the export)
    metrics: dict[str, float]  # what train() returned


# The session's trained run: DFW (attention=decay) on the tiny GPT-2, 4 steps, validated at conversion and at
# steps 2 and 4, tested, checkpointed and exported. The scheduler length is fixed so that a run stopped at
# step 2 and resumed follows the same learning-rate schedule (tests/test_train.py, exact resume).
TRAINED_RUN = ["attention=decay", "module.scheduler.num_training_steps=4"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, text_files) -> TrainedRun:
    """One tiny decay run through the real config, shared by every test that only needs a trained run.
    Read it; never write into it (copy it first)."""
    from dfw.train import train

    root = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(root, text_files, *TRAINED_RUN)
    cfg = compose(*overrides)
    metrics = train(cfg)
    return TrainedRun(overrides=overrides, cfg=cfg, dir=root / "run", metrics=metrics)
