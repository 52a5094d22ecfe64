"""`copy`: in-context copying ("Repeat After Me", Jelassi et al. 2024; induction heads, Olsson et al. 2022).

Each sequence is a span of L tokens followed by the same span again (dfw.data.synthetic), the span either
random tokens of the vocabulary (`random`: only copying predicts the second copy; chance is 1/V) or L
consecutive tokens of the corpus's validation text (`text`). Scored on the second copy: top-1 accuracy
and loss of its tokens 2..L (its first token cannot be known to be a repeat), beside the loss of the
first copy's tokens 2..L (what the model predicts without copying). A softmax model with induction heads
copies almost perfectly; a finite state degrades as L grows past what it can hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import copy_sequences, random_spans, text_spans
from ..errors import ConfigError
from .base import EvalModel, EvalTask, Measurement, generator, positive_int, positive_ints

VARIANTS = ("random", "text")


def default_lengths(context: int) -> list[int]:
    """8, 16, 32, ... up to half the context."""
    lengths, length = [], 8
    while 2 * length <= context:
        lengths.append(length)
        length *= 2
    return lengths


@dataclass
class Copy(EvalTask):
    name = "copy"

    lengths: list[int] | None = None  # span lengths L; null: 8, 16, ... up to half the model's context
    samples: int = 64  # sequences per variant and L
    variants: list[str] | None = None  # random and/or text; null: both
    split: str = "validation"  # where the text spans come from

    def __post_init__(self) -> None:
        self.lengths = positive_ints("copy", "lengths", self.lengths)
        positive_int("copy", "samples", self.samples)
        self.variants = list(VARIANTS) if self.variants is None else list(self.variants)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(
                f"copy.variants must be a non-empty list of {' and '.join(VARIANTS)}, got {self.variants!r}"
            )

    def check(self, model: EvalModel, data: Any) -> None:
        for length in self.lengths or []:
            if length < 2 or 2 * length > model.context:
                raise ConfigError(
                    f"copy.lengths: L={length} needs 2L = {2 * length} tokens, more than the model's context "
                    f"of {model.context}; use L from 2 to {model.context // 2}"
                )
        if not self.lengths and model.context < 16:
            raise ConfigError(
                f"copy: the model's context ({model.context}) is too short for L=8; set copy.lengths"
            )
        if "text" in self.variants:
            longest = max(self.lengths or default_lengths(model.context))
            if len(data.tokens(self.split)) < longest:
                raise ConfigError(
                    f"copy: the {self.split} split of data={data.corpus} is shorter than L={longest}"
                )

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        lengths = self.lengths or default_lengths(model.context)
        text = data.tokens(self.split) if "text" in self.variants else None
        ids = model.ordinary_ids()
        results = []
        for variant in self.variants:
            accuracies = []
            for length in lengths:
                rng = generator(self.seed, "copy", variant, length)
                spans = (
                    random_spans(ids, self.samples, length, rng)
                    if variant == "random"
                    else text_spans(text, self.samples, length, rng)
                )
                loss_first, loss_second, correct = _score(
                    model, copy_sequences(spans), length, f"copy {variant} L={length}"
                )
                accuracies.append(correct)
                common = dict(variant=variant, axis="L", x=length)
                results += [
                    Measurement("copy", "acc", correct, **common),
                    Measurement("copy", "loss", loss_second, **common),
                    Measurement("copy", "loss_first", loss_first, **common),
                ]
            results.append(
                Measurement(
                    "copy",
                    "acc",
                    sum(accuracies) / len(accuracies),
                    variant=variant,
                    axis="L",
                    headline=variant == self.variants[0],
                )
            )
        return results


def _score(
    model: EvalModel, tokens: torch.Tensor, length: int, description: str
) -> tuple[float, float, float]:
    """(loss on the first copy, loss on the second, top-1 accuracy on the second), tokens 2..L of each."""
    first = torch.arange(1, length)  # predicted positions: tokens 2..L of the first copy
    second = first + length  # and of the second
    sums = torch.zeros(3, dtype=torch.float64)
    for rows, logits in model.logits_batches(tokens, description):
        batch = tokens[rows].to(logits.device)  # (b, 2L)
        for i, positions in enumerate((first, second)):
            predicted = logits[:, positions - 1]  # (b, L-1, V): the logits before each position
            targets = batch[:, positions]  # (b, L-1)
            sums[i] += float(F.cross_entropy(predicted.transpose(1, 2), targets, reduction="sum"))
            if i == 1:
                sums[2] += float((predicted.argmax(dim=-1) == targets).sum())
    count = len(tokens) * (length - 1)
    return float(sums[0]) / count, float(sums[1]) / count, float(sums[2]) / count
