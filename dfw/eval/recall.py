"""`recall`: multi-query associative recall (MQAR, Zoology, Arora et al. 2023), the number of pairs swept.

Each sequence holds N key-value pairs, then every key again in a random order, each followed by its value
(4N tokens; dfw.data.synthetic). Keys come from one half of the vocabulary's ordinary ids, values from the
other, drawn without replacement; the sequences are generated in code from the seed (no download).
Scored where a query key is followed by its value: top-1 accuracy and loss of the value. A fixed-size
state that cannot hold N associations loses them as N grows; softmax attention looks them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from ..data.synthetic import key_and_value_ids, recall_sequences
from ..errors import ConfigError
from .base import EvalModel, EvalTask, Measurement, generator, positive_int, positive_ints


def default_pairs(context: int) -> list[int]:
    """4, 8, 16, ... as many pairs as fit (4N tokens <= the context)."""
    pairs, n = [], 4
    while 4 * n <= context:
        pairs.append(n)
        n *= 2
    return pairs


@dataclass
class Recall(EvalTask):
    name = "recall"

    pairs: list[int] | None = (
        None  # numbers of key-value pairs N; null: 4, 8, 16, ... while 4N fits the context
    )
    samples: int = 64  # sequences per N

    def __post_init__(self) -> None:
        self.pairs = positive_ints("recall", "pairs", self.pairs)
        positive_int("recall", "samples", self.samples)

    def check(self, model: EvalModel, data: Any) -> None:
        keys, values = key_and_value_ids(model.ordinary_ids())
        for n in self.pairs or []:
            if 4 * n > model.context:
                raise ConfigError(
                    f"recall.pairs: N={n} needs 4N = {4 * n} tokens, more than the model's context of "
                    f"{model.context}; use N up to {model.context // 4}"
                )
            if n > min(len(keys), len(values)):
                raise ConfigError(
                    f"recall.pairs: N={n} needs {n} distinct keys, the vocabulary has {len(keys)}"
                )
        if not self.pairs and model.context < 16:
            raise ConfigError(
                f"recall: the model's context ({model.context}) is too short for 4 pairs; set recall.pairs"
            )

    def run(self, model: EvalModel, data: Any) -> list[Measurement]:
        key_ids, value_ids = key_and_value_ids(model.ordinary_ids())
        results, accuracies = [], []
        for n in self.pairs or default_pairs(model.context):
            tokens, positions, answers = recall_sequences(
                key_ids, value_ids, self.samples, n, generator(self.seed, "recall", n)
            )
            loss_sum = correct = 0.0
            for rows, logits in model.logits_batches(tokens, f"recall N={n}"):
                index = positions[rows].to(logits.device)  # (b, N)
                predicted = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))  # (b, N, V)
                target = answers[rows].to(logits.device)  # (b, N)
                loss_sum += float(F.cross_entropy(predicted.transpose(1, 2), target, reduction="sum"))
                correct += float((predicted.argmax(dim=-1) == target).sum())
            count = self.samples * n
            accuracies.append(correct / count)
            results += [
                Measurement("recall", "acc", correct / count, axis="pairs", x=n),
                Measurement("recall", "loss", loss_sum / count, axis="pairs", x=n),
            ]
        results.append(
            Measurement("recall", "acc", sum(accuracies) / len(accuracies), axis="pairs", headline=True)
        )
        return results
