"""Synthetic sequences that only a model able to copy or recall can predict, for evaluation and training.

Two kinds, written with token ids of the model's own vocabulary (every id but the special tokens):

- **copy** (in-context copying, induction; "Repeat After Me", Jelassi et al. 2024): a span of L tokens
  followed by the same span again, `[x_1 .. x_L, x_1 .. x_L]`. The span is either random tokens (only
  copying predicts the second copy) or a span of real text.
- **recall** (multi-query associative recall, MQAR; Zoology, Arora et al. 2023): N key-value pairs, then
  every key again in a random order, each followed by its value,
  `[k_1 v_1 .. k_N v_N, k_p1 v_p1 .. k_pN v_pN]` (4N tokens). As in Zoology, keys come from one half of
  the ordinary ids and values from the other, both drawn without replacement, and a prediction is
  scored where a query key is followed by its value. Unlike Zoology the queries follow the pairs at
  once, without its power-law gaps and filler tokens (our contexts are 128 tokens).

The generators take a `torch.Generator`, so a sequence is a pure function of its seed. `dfw.eval`'s
`copy` and `recall` tasks score them; `SyntheticMix` writes them into a share of the training blocks
(`data.synthetic`, the teacher recipe that can copy and recall: `experiment=recall_teacher`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dfw.errors import ConfigError


def ordinary_ids(vocab_size: int, special_ids: list[int] | tuple[int, ...] = ()) -> Tensor:
    """Every token id below `vocab_size` except the special ones (EOS, ...), ascending: [V']."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in special_ids if 0 <= i < vocab_size]] = False
    return keep.nonzero().squeeze(1)


def key_and_value_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Zoology's split of the vocabulary: keys from its first half, values from its second."""
    half = len(ids) // 2
    return ids[:half], ids[half:]


def random_spans(ids: Tensor, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """[B, L] tokens drawn uniformly (with replacement) from `ids`."""
    return ids[torch.randint(len(ids), (batch_size, length), generator=generator)]


def text_spans(tokens: Tensor, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """[B, L] spans of consecutive tokens of `tokens` (1D), at random offsets."""
    if len(tokens) < length:
        raise ConfigError(f"the text has {len(tokens)} tokens, too few for spans of {length}")
    starts = torch.randint(len(tokens) - length + 1, (batch_size, 1), generator=generator)
    return tokens[starts + torch.arange(length)]  # (B, L)


def copy_sequences(spans: Tensor) -> Tensor:
    """[B, L] spans -> [B, 2L]: each span followed by itself."""
    return torch.cat([spans, spans], dim=1)


def _distinct(ids: Tensor, batch_size: int, count: int, generator: torch.Generator) -> Tensor:
    """[B, count] ids of `ids`, distinct within each row."""
    order = torch.rand(batch_size, len(ids), generator=generator).argsort(dim=1)[:, :count]  # (B, count)
    return ids[order]


def recall_sequences(
    key_ids: Tensor, value_ids: Tensor, batch_size: int, pairs: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """MQAR sequences of `pairs` key-value pairs, every key queried once.

    Returns (tokens [B, 4N], query_positions [B, N], answers [B, N]): the logits at a query key's
    position predict its value, `answers` (= tokens[:, query_positions + 1]).
    """
    if pairs > min(len(key_ids), len(value_ids)):
        raise ConfigError(
            f"recall with {pairs} pairs needs {pairs} distinct keys and values; the vocabulary has fewer"
        )
    keys = _distinct(key_ids, batch_size, pairs, generator)  # (B, N)
    values = _distinct(value_ids, batch_size, pairs, generator)  # (B, N)
    context = torch.stack([keys, values], dim=2).flatten(1)  # (B, 2N): k_1 v_1 k_2 v_2 ...
    order = torch.rand(batch_size, pairs, generator=generator).argsort(dim=1)  # (B, N)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)  # (B, 2N)
    tokens = torch.cat([context, queries], dim=1)  # (B, 4N)
    query_positions = (2 * pairs + 2 * torch.arange(pairs)).expand(batch_size, pairs)  # (B, N)
    return tokens, query_positions, values.gather(1, order)


# --- Mixed into training blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticOptions:
    """`data.synthetic`: which training blocks carry a synthetic segment, and which kind."""

    share: float = 0.25  # of the training blocks, those that carry one segment (the rest stay text)
    recall: float = 0.5  # of those, the share of recall segments (the others are copy segments)
    random_tokens: float = 0.5  # of the copy segments, the share whose span is random tokens (else text)
    min_length: int = 4  # shortest copied span L, in tokens (the longest: half the block)

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> SyntheticOptions | None:
        if node is None:
            return None
        if not isinstance(node, Mapping):
            raise ConfigError(
                f"data.synthetic must be a mapping of {', '.join(f.name for f in fields(cls))}, or null"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - names)
        if unknown:
            raise ConfigError(
                f"data.synthetic.{unknown[0]} is not an option; its options are {', '.join(sorted(names))}"
            )
        options = cls(**node)
        for name in ("share", "recall", "random_tokens"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ConfigError(f"data.synthetic.{name} must be a fraction between 0 and 1, got {value!r}")
        if (
            isinstance(options.min_length, bool)
            or not isinstance(options.min_length, int)
            or options.min_length < 1
        ):
            raise ConfigError(
                f"data.synthetic.min_length must be a positive integer, got {options.min_length!r}"
            )
        return options


class SyntheticMix(Dataset):
    """Training blocks of `blocks`, a share of them with one synthetic segment written over a random place.

    Block i is a pure function of (seed, i), so a resumed run sees the blocks the uninterrupted run saw.
    A copy segment is 2L tokens (L uniform in [min_length, T // 2]), a recall segment 4N (N uniform in
    [1, T // 4]); the block's other tokens stay the text they were.
    """

    def __init__(self, blocks: Dataset, options: SyntheticOptions, ids: Tensor, seed: int) -> None:
        self.blocks, self.options, self.ids, self.seed = blocks, options, ids, seed
        self.key_ids, self.value_ids = key_and_value_ids(ids)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        block = self.blocks[index]["input_ids"].clone()  # (T,)
        T = len(block)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        uniform = lambda: float(torch.rand((), generator=generator))
        if uniform() >= self.options.share:
            return {"input_ids": block}
        if uniform() < self.options.recall:
            pairs = int(torch.randint(1, max(1, T // 4) + 1, (), generator=generator))
            segment = recall_sequences(self.key_ids, self.value_ids, 1, pairs, generator)[0][0]  # (4N,)
        else:
            length = int(
                torch.randint(min(self.options.min_length, T // 2), T // 2 + 1, (), generator=generator)
            )
            if uniform() < self.options.random_tokens:
                span = random_spans(self.ids, 1, length, generator)[0]  # (L,)
            else:
                other = self.blocks[int(torch.randint(len(self.blocks), (), generator=generator))][
                    "input_ids"
                ]
                span = text_spans(other, 1, length, generator)[0]  # (L,)
            segment = torch.cat([span, span])  # (2L,)
        start = int(torch.randint(T - len(segment) + 1, (), generator=generator))
        block[start : start + len(segment)] = segment
        return {"input_ids": block}
