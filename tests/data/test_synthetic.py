"""dfw.data.synthetic: the copy and MQAR sequences are what they claim, a pure function of the seed, and
`data.synthetic` writes them into the stated share of training blocks, leaving the rest of each block as it
was."""

from __future__ import annotations

import pytest
import torch

from dfw.data.synthetic import (
    SyntheticMix,
    SyntheticOptions,
    copy_sequences,
    key_and_value_ids,
    ordinary_ids,
    random_spans,
    recall_sequences,
    text_spans,
)
from dfw.errors import ConfigError


def test_ordinary_ids_leave_out_the_special_tokens_and_split_into_keys_and_values():
    ids = ordinary_ids(10, [0, 7])
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 8, 9]
    keys, values = key_and_value_ids(ids)
    assert keys.tolist() == [1, 2, 3, 4] and values.tolist() == [5, 6, 8, 9]


def test_copy_sequences_repeat_each_span_once():
    g = torch.Generator().manual_seed(0)
    spans = random_spans(ordinary_ids(50, [0]), 5, 7, g)
    tokens = copy_sequences(spans)
    assert tokens.shape == (5, 14) and torch.equal(tokens[:, :7], tokens[:, 7:]) and (tokens != 0).all()
    text = torch.arange(100)
    spans = text_spans(text, 4, 9, torch.Generator().manual_seed(1))
    assert ((spans[:, 1:] - spans[:, :-1]) == 1).all()  # consecutive tokens of the text


def test_recall_sequences_are_pairs_then_every_key_queried_with_its_value():
    keys, values = key_and_value_ids(ordinary_ids(200, [0]))
    tokens, positions, answers = recall_sequences(keys, values, 6, 5, torch.Generator().manual_seed(2))
    assert tokens.shape == (6, 20) and positions.shape == answers.shape == (6, 5)
    for row in range(6):
        context, queries = tokens[row, :10].tolist(), tokens[row, 10:].tolist()
        pairs = dict(zip(context[0::2], context[1::2], strict=True))
        assert (
            len(pairs) == 5
            and set(pairs) <= set(keys.tolist())
            and set(pairs.values()) <= set(values.tolist())
        )
        assert len(set(pairs.values())) == 5  # values drawn without replacement too
        assert sorted(queries[0::2]) == sorted(pairs)  # every key queried exactly once
        for position, answer in zip(positions[row].tolist(), answers[row].tolist(), strict=True):
            assert pairs[tokens[row, position].item()] == answer == tokens[row, position + 1].item()


def test_sequences_are_a_pure_function_of_the_seed():
    keys, values = key_and_value_ids(ordinary_ids(300, [0]))
    a = recall_sequences(keys, values, 3, 8, torch.Generator().manual_seed(5))[0]
    b = recall_sequences(keys, values, 3, 8, torch.Generator().manual_seed(5))[0]
    c = recall_sequences(keys, values, 3, 8, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int, T: int) -> None:
        self.data = torch.arange(n * T).view(n, T) % 90 + 1  # never 0 (the special token)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i].clone()}


def _segment(original: torch.Tensor, mixed: torch.Tensor) -> tuple[int, int]:
    changed = (original != mixed).nonzero().squeeze(1)
    return int(changed.min()), int(changed.max()) + 1


def test_synthetic_mix_writes_one_segment_into_the_stated_share_of_blocks():
    blocks = Blocks(400, 64)
    mix = SyntheticMix(blocks, SyntheticOptions(share=0.25, recall=0.5), ordinary_ids(100, [0]), seed=3)
    changed = [i for i in range(len(blocks)) if not torch.equal(mix[i]["input_ids"], blocks[i]["input_ids"])]
    assert (
        0.17 < len(changed) / len(blocks) < 0.33
    )  # a quarter, up to sampling noise (and rare no-op segments)
    assert torch.equal(
        mix[changed[0]]["input_ids"], mix[changed[0]]["input_ids"]
    )  # a pure function of (seed, index)
    copies = 0
    for i in changed:
        original, mixed = blocks[i]["input_ids"], mix[i]["input_ids"]
        start, end = _segment(original, mixed)
        assert torch.equal(mixed[:start], original[:start]) and torch.equal(mixed[end:], original[end:])
        length = end - start
        half = mixed[start : start + length // 2]
        if length % 2 == 0 and torch.equal(half, mixed[start + length // 2 : end]):
            copies += 1  # a repeated span (a recall segment never repeats: its keys are distinct)
    assert 0.25 < copies / len(changed) < 0.75


def test_synthetic_mix_with_share_zero_is_the_text_and_options_are_checked():
    blocks = Blocks(20, 32)
    mix = SyntheticMix(blocks, SyntheticOptions(share=0.0), ordinary_ids(100, [0]), seed=0)
    assert all(torch.equal(mix[i]["input_ids"], blocks[i]["input_ids"]) for i in range(20))
    with pytest.raises(
        ConfigError, match=r"data.synthetic.share must be a fraction between 0 and 1, got 1.5"
    ):
        SyntheticOptions.from_config({"share": 1.5})
    with pytest.raises(ConfigError, match=r"data.synthetic.shares is not an option"):
        SyntheticOptions.from_config({"shares": 0.5})
    assert SyntheticOptions.from_config(None) is None
