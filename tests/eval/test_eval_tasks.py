"""dfw.eval's tasks measure what they claim: each against a model whose answer is known (a perfect copier,
an associative lookup, a blind model) or against the same number computed another way (torchmetrics'
perplexity, greedy decoding by recomputation), deterministic for a seed, with bad options refused."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchmetrics.text import Perplexity

from dfw.data.tokenizers import gpt2_tokenizer
from dfw.errors import ConfigError
from dfw.eval import EvalModel, ModelInfo, build_tasks
from dfw.eval.data import EvalData
from dfw.eval.load import describe
from dfw.eval.passkey import FILLER, INTRO, QUESTION
from dfw.eval.ppl import position_bins
from dfw.model import build_model
from tests.conftest import CONF, save_tiny_gpt2

V = 50257  # GPT-2's vocabulary (the tokenizer every model here uses)


class Oracle(nn.Module):
    """A stand-in language model whose predictions are known: `copy_offset=L` predicts, from position L on,
    the token L - 1 positions back (a perfect copier of a span of length L); `lookup` predicts the token that
    followed the latest earlier occurrence of the current token (associative recall), uniform elsewhere."""

    def __init__(
        self, context: int, copy_offset: int | None = None, lookup: bool = False, wrong: bool = False
    ):
        super().__init__()
        self.config = SimpleNamespace(n_positions=context, vocab_size=V)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.copy_offset, self.lookup, self.wrong = copy_offset, lookup, wrong

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, V)
        for b in range(B):
            for t in range(T):
                target = None
                if self.copy_offset is not None and t >= self.copy_offset:
                    target = input_ids[b, t - self.copy_offset + 1]
                if self.lookup:
                    earlier = (input_ids[b, :t] == input_ids[b, t]).nonzero()
                    target = input_ids[b, earlier[-1] + 1] if len(earlier) else None
                if target is not None:
                    logits[b, t, (int(target) + self.wrong) % V] = 30.0
        return SimpleNamespace(logits=logits)


def _info(context: int, attention: str = "softmax") -> ModelInfo:
    return ModelInfo(
        source="test",
        kind="test",
        attention=attention,
        state_size=None,
        state_bytes=0,
        context=context,
        parameters=0,
    )


def _model(net: nn.Module, context: int, batch_size: int = 8) -> EvalModel:
    return EvalModel(net, gpt2_tokenizer(), _info(context), batch_size, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> EvalData:
    node = OmegaConf.create(
        {
            "_target_": "dfw.data.LanguageModelingDataModule",
            "corpus": "tiny",
            "tokenizer": "gpt2",
            "block_size": 32,
            "batch_size": 4,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
        }
    )
    return EvalData(node, gpt2_tokenizer())


def _task(name: str, seed: int = 1234, **options):
    return build_tasks([name], {name: options}, seed)[0]


def _by(results, metric, **where):
    return [m for m in results if m.metric == metric and all(getattr(m, k) == v for k, v in where.items())]


def test_copy_scores_a_perfect_copier_at_full_accuracy_and_the_first_copy_at_chance(data):
    L = 8
    results = _task("copy", lengths=[L], samples=5).run(_model(Oracle(32, copy_offset=L), 32), data)
    for variant in ("random", "text"):
        (acc,) = _by(results, "acc", variant=variant, x=L)
        (loss,) = _by(results, "loss", variant=variant, x=L)
        (first,) = _by(results, "loss_first", variant=variant, x=L)
        assert acc.value == 1.0 and loss.value < 1e-6
        assert first.value == pytest.approx(math.log(V), rel=1e-6)  # uniform logits on the first copy
    headline = [m for m in results if m.headline]
    assert len(headline) == 1 and headline[0].variant == "random" and headline[0].value == 1.0


def test_copy_of_a_copier_off_by_one_token_is_zero():
    results = _task("copy", lengths=[4], samples=3, variants=["random"]).run(
        _model(Oracle(16, copy_offset=4, wrong=True), 16), None
    )
    assert _by(results, "acc", x=4)[0].value == 0.0 and _by(results, "loss", x=4)[0].value > 20


def test_recall_scores_an_associative_lookup_at_full_accuracy_and_a_wrong_one_at_zero():
    right = _task("recall", pairs=[2, 4], samples=3).run(_model(Oracle(16, lookup=True), 16), None)
    wrong = _task("recall", pairs=[2, 4], samples=3).run(
        _model(Oracle(16, lookup=True, wrong=True), 16), None
    )
    assert [m.value for m in _by(right, "acc", axis="pairs") if m.x] == [1.0, 1.0]
    assert [m.value for m in _by(wrong, "acc", axis="pairs") if m.x] == [0.0, 0.0]
    assert all(m.value < 1e-6 for m in _by(right, "loss"))
    assert [m.value for m in right if m.headline] == [1.0]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), vocab_size=V, n_positions=64)


def test_ppl_is_torchmetrics_perplexity_and_its_bins_the_loss_at_their_positions(tiny_gpt2, data):
    results = _task("ppl", max_blocks=5).run(_model(tiny_gpt2, 64, batch_size=2), data)
    tokens = torch.stack([data.blocks("validation", 64)[i]["input_ids"] for i in range(5)])  # (5, 64)
    with torch.no_grad():
        logits = tiny_gpt2(tokens).logits[:, :-1]  # (5, 63, V)
    reference = Perplexity()
    reference.update(logits, tokens[:, 1:])
    (overall,) = [m for m in results if m.headline]
    assert overall.value == pytest.approx(float(reference.compute()), rel=1e-5)
    loss = F.cross_entropy(
        logits.transpose(1, 2), tokens[:, 1:], reduction="none"
    ).double()  # (5, 63): position t+1
    bins = _by(results, "ppl", axis="position")
    assert [(m.x, m.x_to) for m in bins] == position_bins(64) == [(0, 15), (16, 31), (32, 63)]
    for m in bins:
        first, last = max(int(m.x), 1), int(m.x_to)
        assert m.value == pytest.approx(math.exp(loss[:, first - 1 : last].mean()), rel=1e-5)


def test_synthetic_tasks_are_deterministic_for_a_seed(tiny_gpt2):
    model = _model(tiny_gpt2, 64)
    run = lambda seed: [
        m.value
        for name in ("copy", "recall")
        for m in _task(
            name, seed=seed, samples=4, **({"variants": ["random"]} if name == "copy" else {})
        ).run(model, None)
    ]
    assert run(7) == run(7) and run(7) != run(8)


def test_passkey_finds_the_key_a_reader_of_the_prompt_answers_and_places_it_at_the_depth():
    tokenizer = gpt2_tokenizer()
    model = _model(Oracle(256), 256)
    task = _task("passkey", lengths=[200], depths=[0, 1], samples=3)
    task.check(model, None)
    prompts = []

    def reader(prompts_, max_new_tokens, description):  # answers with the key the prompt states
        prompts.extend(tokenizer.decode(p) for p in prompts_)
        keys = [re.search(r"The pass key is (\d+)", tokenizer.decode(p)).group(1) for p in prompts_]
        return [tokenizer(" " + key, add_special_tokens=False).input_ids for key in keys]

    model.generate = reader
    results = task.run(model, None)
    assert [m.value for m in results] == [1.0, 1.0, 1.0]
    assert prompts[0].startswith(INTRO + " The pass key is") and prompts[0].endswith(QUESTION)  # depth 0
    assert prompts[-1].startswith(INTRO + FILLER) and re.search(
        r"is the pass key\." + re.escape(QUESTION) + "$", prompts[-1]
    )
    assert all(
        200 - 24 < len(tokenizer(p).input_ids) <= 200 for p in prompts
    )  # whole filler sentences (24 tokens)
    model.generate = lambda prompts_, n, d: [
        tokenizer(" 12", add_special_tokens=False).input_ids for _ in prompts_
    ]
    assert [m.value for m in task.run(model, None)] == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def converted_tiny():
    torch.manual_seed(0)
    attention = OmegaConf.load(CONF / "attention" / "decay.yaml")
    model = OmegaConf.create(
        {"pretrained": None, "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    )
    return build_model(model, attention, gpt2_tokenizer()).eval()


def test_generation_of_a_converted_model_is_its_greedy_recomputation_with_left_padding(converted_tiny):
    tokenizer = gpt2_tokenizer()
    info = describe(converted_tiny, "test", "test", {"name": "decay"})
    assert info.attention == "decay" and info.state_size == 16 and info.state_bytes > 0
    model = EvalModel(converted_tiny, tokenizer, info, batch_size=3, progress=False)
    prompts = [tokenizer(text).input_ids for text in ("Hello", "The quick brown fox jumps", "To be, or not")]
    generated = model.generate(prompts, 5, "test")
    for prompt, new in zip(prompts, generated, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(5):  # recomputation: the whole sequence, no cache, argmax
                ids = torch.cat([ids, converted_tiny(ids).logits[:, -1:].argmax(-1)], dim=1)
        assert new == ids[0, len(prompt) :].tolist()
    assert model.tokens == sum(len(p) for p in prompts) + 3 * 5


@pytest.mark.parametrize(
    ("names", "options", "message"),
    [
        (
            ["nope"],
            {},
            r"tasks: 'nope' is not a dfw.eval task; the tasks are copy, lm_eval, passkey, ppl, recall",
        ),
        ([], {}, r"tasks is empty"),
        (["copy", "copy"], {}, r"tasks: copy is listed twice"),
        (
            ["copy"],
            {"copy": {"lenghts": [8]}},
            r"copy.lenghts is not an option of the copy task; its options are lengths, ",
        ),
        (
            ["recall"],
            {"recall": {"pairs": [0]}},
            r"recall.pairs must be a non-empty list of positive integers, got \[0\]",
        ),
        (
            ["recall"],
            {"recall": {"pairs": 0}},
            r"recall.pairs must be a non-empty list of positive integers, got 0",
        ),
        (
            ["copy"],
            {"copy": {"variants": ["shuffled"]}},
            r"copy.variants must be a non-empty list of random and text",
        ),
        (["ppl"], {"ppl": {"split": "dev"}}, r"ppl.split must be one of train, validation, test, got 'dev'"),
        (
            ["passkey"],
            {"passkey": {"depths": [1.5]}},
            r"passkey.depths must be a non-empty list of fractions from 0 to 1",
        ),
        (["lm_eval"], {"lm_eval": {"tasks": []}}, r"lm_eval.tasks is empty"),
    ],
)
def test_bad_task_options_are_one_config_error(names, options, message):
    with pytest.raises(ConfigError, match=message):
        build_tasks(names, options, 0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "copy",
            {"lengths": [8, 40]},
            r"copy.lengths: L=40 needs 2L = 80 tokens, more than the model's context of 64; "
            r"use L from 2 to 32",
        ),
        (
            "recall",
            {"pairs": [17]},
            r"recall.pairs: N=17 needs 4N = 68 tokens, more than the model's context of 64; use N up to 16",
        ),
        ("ppl", {"block_size": 65}, r"ppl.block_size=65 does not fit the model's context of 64 positions"),
        (
            "passkey",
            {"lengths": [64]},
            r"passkey.lengths: 64 tokens and \d+ to generate exceed the model's context of 64",
        ),
        ("passkey", {"lengths": [20]}, r"passkey.lengths: 20 tokens cannot hold the prompt"),
    ],
)
def test_options_that_do_not_fit_the_model_are_refused_before_running(
    tiny_gpt2, data, name, options, message
):
    with pytest.raises(ConfigError, match=message):
        _task(name, **options).check(_model(tiny_gpt2, 64), data)
