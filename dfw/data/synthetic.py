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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dfw.data.sampler import ResumableSampler
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

FRACTIONS = ("share", "recall", "random_tokens")

Fraction = float | list[list[float]]  # a number, or a schedule: [[step, fraction], ...] (SyntheticOptions)


def fraction_at(value: Fraction, step: int) -> float:
    """A fraction or its schedule at an optimizer step: piecewise linear between the [step, fraction] points,
    the first point's fraction before it and the last one's after it."""
    if isinstance(value, int | float):
        return float(value)
    for (s0, f0), (s1, f1) in zip(value, value[1:], strict=False):
        if step <= s1:
            return f0 if step <= s0 else f0 + (f1 - f0) * (step - s0) / (s1 - s0)
    return float(value[0][1] if step <= value[0][0] else value[-1][1])


@dataclass(frozen=True)
class SyntheticOptions:
    """`data.synthetic`: which training blocks carry a synthetic segment, and which kind.

    `share`, `recall` and `random_tokens` are each a fraction or a schedule over the optimizer step: a list
    of [step, fraction] points, piecewise linear between them and constant before the first and after the
    last (`share: [[0, 0.9], [300, 0.9], [600, 0.1]]`: nine blocks in ten for 300 steps, then down to one in
    ten at step 600 and after).
    """

    share: Fraction = 0.25  # of the training blocks, those that carry one segment (the rest stay text)
    recall: Fraction = 0.5  # of those, the share of recall segments (the others are copy segments)
    random_tokens: Fraction = 0.5  # of the copy segments, the share whose span is random tokens (else text)
    min_length: int = 4  # shortest copied span L, in tokens (the longest: the block / the number of copies)
    max_copies: int = 2  # a copy segment holds the span 2 to max_copies times (uniform); 2: once repeated
    alphabet: int | None = None  # random spans draw from the first `alphabet` ordinary ids; null: all of them

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
        values = {
            name: _fraction(name, value) if name in FRACTIONS else value for name, value in node.items()
        }
        options = cls(**values)
        for name, least in (("min_length", 1), ("max_copies", 2), ("alphabet", 1)):
            value = getattr(options, name)
            if name == "alphabet" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(
                    f"data.synthetic.{name} must be an integer of at least {least}, got {value!r}"
                )
        return options

    def at(self, step: int) -> tuple[float, float, float]:
        """(share, recall, random_tokens) at an optimizer step."""
        return tuple(fraction_at(getattr(self, name), step) for name in FRACTIONS)  # type: ignore[return-value]


def _is_fraction(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= 1


def _fraction(name: str, value: Any) -> Fraction:
    """A fraction, or a schedule as a list of [step, fraction] lists (checked, steps increasing)."""
    if _is_fraction(value):
        return value
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(
            f"data.synthetic.{name} must be a fraction between 0 and 1 or a list of [step, fraction] points, "
            f"got {value!r}"
        )
    points = [
        list(point) if isinstance(point, Sequence) and not isinstance(point, str) else point
        for point in value
    ]
    steps = [point[0] for point in points if isinstance(point, list) and len(point) == 2]
    if (
        not points
        or len(steps) != len(points)
        or not all(_is_fraction(point[1]) for point in points)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps)
        or any(b <= a for a, b in zip(steps, steps[1:], strict=False))
    ):
        raise ConfigError(
            f"data.synthetic.{name}: a schedule is a list of [step, fraction] points, steps non-negative "
            f"integers in increasing order and fractions between 0 and 1, e.g. [[0, 0.9], [300, 0.1]]; "
            f"got {value!r}"
        )
    return [[int(s), float(f)] for s, f in points]


class SyntheticMix(Dataset):
    """The training stream's blocks, a share of them with one synthetic segment written over a random place.

    Indexed by position in the training stream, not by block: `order` (the `ResumableSampler` of the
    training loader, which then yields stream positions) maps position k to its block, and k's optimizer
    step, k // order.samples_per_step, is where the options' schedules are read. The block at position k
    is a pure function of (seed, k), so a resumed run sees the blocks the uninterrupted run saw, and a
    block seen again in a later pass over the data gets a new segment.
    A copy segment is c copies of a span of L tokens (c uniform in [2, max_copies], then L uniform in
    [min_length, T // c]), a recall segment 4N tokens (N uniform in [1, T // 4]); the block's other tokens
    stay the text they were.
    """

    def __init__(
        self, blocks: Dataset, options: SyntheticOptions, ids: Tensor, seed: int, order: ResumableSampler
    ) -> None:
        self.blocks, self.options, self.ids, self.seed, self.order = blocks, options, ids, seed, order
        self.key_ids, self.value_ids = key_and_value_ids(ids)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        block = self.blocks[self.order.index_at(position)]["input_ids"].clone()  # (T,)
        T = len(block)
        share, recall, random_tokens = self.options.at(position // self.order.samples_per_step)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        uniform = lambda: float(torch.rand((), generator=generator))
        if uniform() >= share:
            return {"input_ids": block}
        if uniform() < recall:
            pairs = int(torch.randint(1, max(1, T // 4) + 1, (), generator=generator))
            segment = recall_sequences(self.key_ids, self.value_ids, 1, pairs, generator)[0][0]  # (4N,)
        else:
            copies = int(torch.randint(2, self.options.max_copies + 1, (), generator=generator))
            longest = max(1, T // copies)
            length = int(
                torch.randint(min(self.options.min_length, longest), longest + 1, (), generator=generator)
            )
            if uniform() < random_tokens:
                span = random_spans(self.ids[: self.options.alphabet], 1, length, generator)[0]  # (L,)
            else:
                other = self.blocks[int(torch.randint(len(self.blocks), (), generator=generator))][
                    "input_ids"
                ]
                span = text_spans(other, 1, length, generator)[0]  # (L,)
            segment = span.repeat(copies)[:T]  # (copies * L,)
        start = int(torch.randint(T - len(segment) + 1, (), generator=generator))
        block[start : start + len(segment)] = segment
        return {"input_ids": block}
