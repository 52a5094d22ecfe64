"""`ppl`: perplexity on a corpus (any `data=` option), overall and by position in the context.

The split is cut into consecutive blocks of the model's context (`block_size: null`), as dfw.train
validates; every token of a block but the first is predicted from the tokens before it in that block.
Position bins are 0-15, 16-31, 32-63, 64-127, ... (the predicted token's index in its block; position 0
is never predicted), so a recurrent model that falls behind softmax as the context grows shows it.
Overall perplexity = exp(mean loss over every predicted token), which is what dfw.train logs as val/ppl
on the same blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import EvalModel, EvalTask, Measurement, positive_int

SPLITS = ("train", "validation", "test")


def position_bins(context: int) -> list[tuple[int, int]]:
    """[(first, last)] positions: (0, 15), (16, 31), (32, 63), ... the last one ending at context - 1."""
    bins, start, end = [], 0, 16
    while start < context:
        bins.append((start, min(end, context) - 1))
        start, end = end, 2 * end
    return bins


@dataclass
class Perplexity(EvalTask):
    name = "ppl"

    split: str = "validation"  # train | validation | test
    block_size: int | None = None  # tokens per block; null: the model's context
    max_blocks: int | None = 200  # evaluate the first this many blocks; null: the whole split

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"ppl.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.block_size is not None:
            positive_int("ppl", "block_size", self.block_size)
        if self.max_blocks is not None:
            positive_int("ppl", "max_blocks", self.max_blocks)

    def check(self, model: EvalModel, data: Any) -> None:
        if self.block_size is not None and not 2 <= self.block_size <= model.context:
            raise ConfigError(
                f"ppl.block_size={self.block_size} does not fit the model's context of {model.context} "
                f"positions; use 2 to {model.context}, or null for the whole context"
            )
        data.blocks(
            self.split, self.block_size or model.context
        )  # a split shorter than one block: ConfigError

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        T = self.block_size or model.context
        blocks = data.blocks(self.split, T)
        count = len(blocks) if self.max_blocks is None else min(self.max_blocks, len(blocks))
        tokens = torch.stack([blocks[i]["input_ids"] for i in range(count)])  # (N, T)
        loss_sum = torch.zeros(T, dtype=torch.float64)  # by the predicted token's position; 0 never predicted
        for rows, logits in model.logits_batches(tokens, f"ppl {data.corpus} {self.split}"):
            targets = tokens[rows, 1:].to(logits.device)  # (b, T-1)
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (b, T-1)
            loss_sum[1:] += loss.double().sum(dim=0).cpu()
        variant = f"{data.corpus} {self.split}"
        overall = float(loss_sum.sum()) / (count * (T - 1))
        results = [
            Measurement("ppl", "ppl", math.exp(overall), variant=variant, headline=True),
            Measurement("ppl", "loss", overall, variant=variant),
        ]
        for first, last in position_bins(T):
            predicted = last - max(first, 1) + 1
            mean = float(loss_sum[max(first, 1) : last + 1].sum()) / (count * predicted)
            results.append(
                Measurement(
                    "ppl", "ppl", math.exp(mean), variant=variant, axis="position", x=first, x_to=last
                )
            )
        return results
