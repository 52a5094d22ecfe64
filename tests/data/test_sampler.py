"""The training order is a pure function of (seed, global step), also through a Lightning resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dfw.data import LanguageModelingDataModule, ResumableSampler


def stream(
    step: int,
    max_steps: int = 10,
    num_items: int = 7,
    seed: int = 3,
    samples_per_step: int = 4,
    rank: int = 0,
    world_size: int = 1,
) -> list[int]:
    sampler = ResumableSampler(num_items, seed, samples_per_step, lambda: step, max_steps, rank, world_size)
    indices = list(sampler)
    assert len(indices) == len(sampler)
    return indices


def test_passes_are_seeded_permutations():
    indices = stream(0, max_steps=5)  # 20 samples: 2 full passes over 7 items and part of a third
    first, second = indices[:7], indices[7:14]
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    expected = torch.randperm(7, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert second == expected  # pass p uses seed + p
    assert stream(0, max_steps=5) == indices and stream(0, max_steps=5, seed=4) != indices


def test_starting_at_step_s_continues_the_uninterrupted_stream():
    uninterrupted = stream(0)
    for step in (1, 3, 7, 10):
        assert stream(step) == uninterrupted[step * 4 :]
    assert len(ResumableSampler(7, 0, 4, lambda: 0, None)) == 7  # no max_steps: one pass


def test_ranks_split_the_single_device_stream():
    single = stream(2, samples_per_step=4)
    ranks = [stream(2, samples_per_step=4, rank=r, world_size=2) for r in range(2)]
    assert [i for pair in zip(*ranks, strict=True) for i in pair] == single


class RecordingModule(L.LightningModule):
    """Records every training micro-batch; one parameter so the optimizer has something to step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].tolist())  # (B, T)
        return (self.weight - batch["input_ids"].float().mean() / 1e4) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm: LanguageModelingDataModule, root: Path, ckpt_path: str | None = None) -> RecordingModule:
    model = RecordingModule()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == 6
    return model


def test_positions_are_the_stream_that_index_at_maps_to_the_indices():
    sampler = ResumableSampler(7, 3, 4, lambda: 2, 10, positions=True)
    positions = list(sampler)
    assert positions == list(range(8, 40)) and [sampler.index_at(k) for k in positions] == stream(2)


# data.synthetic with a schedule that changes within the run: the resumed blocks carry the same segments.
SYNTHETIC = {"share": [[0, 1.0], [3, 1.0], [5, 0.5]], "recall": 0.5, "random_tokens": 0.5, "min_length": 2}


@pytest.mark.slow
@pytest.mark.parametrize("synthetic", [None, SYNTHETIC], ids=["text", "synthetic"])
def test_lightning_resume_from_a_mid_run_checkpoint_sees_the_same_batches(tmp_path, synthetic):
    # One training document of 60 numbered lines: ~120 blocks of 3 tokens, enough for 6 steps x 2 x 2 samples.
    (tmp_path / "train.txt").write_text("".join(f"line {i} of the training text\n" for i in range(60)))
    (tmp_path / "other.txt").write_text("a short held-out text for validation and test\n")
    files = {
        "train": str(tmp_path / "train.txt"),
        "validation": str(tmp_path / "other.txt"),
        "test": str(tmp_path / "other.txt"),
    }
    make = lambda: LanguageModelingDataModule(
        "text",
        "gpt2",
        block_size=3 if synthetic is None else 8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
        files=files,
        seed=5,
        synthetic=synthetic,
    )
    uninterrupted = fit(make(), tmp_path / "a").seen  # 6 steps x 2 micro-batches
    assert len(uninterrupted) == 12
    checkpoint = next((tmp_path / "a" / "ckpt").glob("*step=3*.ckpt"))
    resumed = fit(make(), tmp_path / "b", ckpt_path=str(checkpoint)).seen
    assert resumed == uninterrupted[6:]
