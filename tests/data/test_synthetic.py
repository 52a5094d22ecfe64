"""dfw.data.synthetic: the copy and MQAR sequences are what they claim, a pure function of the seed, and
`data.synthetic` writes them into the stated share of training blocks, leaving the rest of each block as it
was."""

from __future__ import annotations

import pytest
import torch

from dfw.data.sampler import ResumableSampler
from dfw.data.synthetic import (
    SyntheticMix,
    SyntheticOptions,
    copy_sequences,
    fraction_at,
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


def mix_of(blocks: Blocks, options: SyntheticOptions, seed: int, samples_per_step: int = 4) -> SyntheticMix:
    order = ResumableSampler(len(blocks), seed, samples_per_step, current_step=lambda: 0, positions=True)
    return SyntheticMix(blocks, options, ordinary_ids(100, [0]), seed, order)


def test_synthetic_mix_writes_one_segment_into_the_stated_share_of_blocks():
    blocks = Blocks(400, 64)
    mix = mix_of(blocks, SyntheticOptions(share=0.25, recall=0.5), seed=3)
    order = mix.order
    originals = [blocks[order.index_at(k)]["input_ids"] for k in range(len(blocks))]
    changed = [k for k in range(len(blocks)) if not torch.equal(mix[k]["input_ids"], originals[k])]
    assert (
        0.17 < len(changed) / len(blocks) < 0.33
    )  # a quarter, up to sampling noise (and rare no-op segments)
    assert torch.equal(
        mix[changed[0]]["input_ids"], mix_of(blocks, SyntheticOptions(), seed=3)[changed[0]]["input_ids"]
    )  # a pure function of (seed, stream position)
    copies = 0
    for k in changed:
        original, mixed = originals[k], mix[k]["input_ids"]
        start, end = _segment(original, mixed)
        assert torch.equal(mixed[:start], original[:start]) and torch.equal(mixed[end:], original[end:])
        length = end - start
        half = mixed[start : start + length // 2]
        if length % 2 == 0 and torch.equal(half, mixed[start + length // 2 : end]):
            copies += 1  # a repeated span (a recall segment never repeats: its keys are distinct)
    assert 0.25 < copies / len(changed) < 0.75


def test_copy_segments_hold_two_to_max_copies_copies_of_their_span():
    blocks = Blocks(300, 64)
    blocks.data.zero_()  # the special token, which no segment holds: the changed tokens are the segment
    options = SyntheticOptions(share=1.0, recall=0.0, random_tokens=1.0, min_length=4, max_copies=4)
    mix = mix_of(blocks, options, seed=4)
    seen = set()
    for k in range(300):
        original, mixed = blocks[mix.order.index_at(k)]["input_ids"], mix[k]["input_ids"]
        start, end = _segment(original, mixed)
        segment = mixed[start:end]
        # the shortest period of the segment is its span; the segment is whole copies of it
        period = next(p for p in range(1, len(segment) + 1) if torch.equal(segment[p:], segment[:-p]))
        copies = len(segment) // period
        assert len(segment) % period == 0 and 4 <= period <= 64 // copies
        seen.add(copies)
    assert seen == {2, 3, 4}


def test_random_spans_draw_from_the_alphabet():
    blocks = Blocks(100, 64)
    blocks.data.zero_()  # the special token: the segment is every non-zero token
    options = SyntheticOptions(share=1.0, recall=0.0, random_tokens=1.0, alphabet=5)
    mix = mix_of(blocks, options, seed=6)
    tokens = torch.cat([mix[k]["input_ids"] for k in range(100)])
    assert set(tokens[tokens != 0].tolist()) == {1, 2, 3, 4, 5}  # the first 5 ordinary ids (0 is special)


def test_a_block_seen_again_in_a_later_pass_gets_a_new_segment():
    blocks = Blocks(50, 64)
    mix = mix_of(blocks, SyntheticOptions(share=1.0, recall=0.0, random_tokens=1.0), seed=1)
    first = {mix.order.index_at(k): mix[k]["input_ids"] for k in range(50)}  # pass 0
    second = {mix.order.index_at(k): mix[k]["input_ids"] for k in range(50, 100)}  # pass 1: the same blocks
    assert sorted(first) == sorted(second) == list(range(50))
    assert sum(torch.equal(first[i], second[i]) for i in range(50)) == 0


def test_schedules_are_piecewise_linear_in_the_optimizer_step():
    schedule = [[0, 0.9], [10, 0.9], [30, 0.1]]
    assert [fraction_at(schedule, s) for s in (0, 10, 20, 30, 1000)] == pytest.approx(
        [0.9, 0.9, 0.5, 0.1, 0.1]
    )
    assert fraction_at([[5, 0.2], [15, 0.6]], 0) == 0.2 and fraction_at(0.3, 99) == 0.3
    options = SyntheticOptions.from_config({"share": [[0, 1], [100, 0]], "recall": 0.0})
    assert options.at(25) == pytest.approx((0.75, 0.0, 0.5))
    # The blocks of steps before the share drops to 0 carry segments; those after it are the text.
    blocks = Blocks(200, 64)
    mix = mix_of(blocks, SyntheticOptions.from_config({"share": [[0, 1], [10, 1], [11, 0]]}), seed=2)
    text = lambda k: torch.equal(mix[k]["input_ids"], blocks[mix.order.index_at(k)]["input_ids"])
    assert not any(text(k) for k in range(40))  # steps 0-9 (4 blocks a step): every block has a segment
    assert all(text(k) for k in range(44, 200))  # steps 11 on: none


@pytest.mark.parametrize(
    "value",
    [[[0, 0.5], [0, 0.1]], [[10, 0.5], [5, 0.1]], [[0, 1.5]], [[0.5, 0.1]], [], [[0, 0.1, 2]], "0.5", True],
)
def test_bad_schedules_are_one_config_error_naming_the_option(value):
    with pytest.raises(ConfigError, match=r"^data.synthetic.share"):
        SyntheticOptions.from_config({"share": value})


def test_synthetic_mix_with_share_zero_is_the_text_and_options_are_checked():
    blocks = Blocks(20, 32)
    mix = mix_of(blocks, SyntheticOptions(share=0.0), seed=0)
    assert all(
        torch.equal(mix[k]["input_ids"], blocks[mix.order.index_at(k)]["input_ids"]) for k in range(40)
    )
    with pytest.raises(
        ConfigError, match=r"data.synthetic.share must be a fraction between 0 and 1 or a list"
    ):
        SyntheticOptions.from_config({"share": 1.5})
    with pytest.raises(ConfigError, match=r"data.synthetic.shares is not an option"):
        SyntheticOptions.from_config({"shares": 0.5})
    assert SyntheticOptions.from_config(None) is None
    with pytest.raises(
        ConfigError, match=r"data.synthetic.max_copies must be an integer of at least 2, got 1"
    ):
        SyntheticOptions.from_config({"max_copies": 1})
    with pytest.raises(ConfigError, match=r"data.synthetic.alphabet must be an integer of at least 1, got 0"):
        SyntheticOptions.from_config({"alphabet": 0})
