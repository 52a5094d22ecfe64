"""An export generates the way transformers' tools call it: `pipeline("text-generation", model=<export>)` and
`model.generate(ids)` without a cache argument, for every preset, on a left-padded batch of two, greedy,
sampled (seeded) and with beams. Each gives what recomputing the whole sequence at every step gives
(`use_cache=False`), and a padded row what it gives alone.

The exports are tiny (2 layers, GPT-2's tokenizer), their new parameters perturbed so that gates and feature
maps depend on the data, and loaded in float64 so that a near tie between two tokens cannot flip a choice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, pipeline, set_seed

import dfw  # noqa: F401  (registers dfw-gpt2 with the Auto classes)
from dfw.cache import RecurrentCache
from dfw.data.tokenizers import gpt2_tokenizer
from dfw.hf import DFWForCausalLM
from dfw.model import build_model, export
from tests.conftest import CONF

PRESETS = sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))
PROMPTS = ["The quick brown fox", "Hi"]  # 4 and 1 tokens: the second row is left-padded by 3
MODES = {
    "greedy": dict(do_sample=False),
    "sampled": dict(do_sample=True, temperature=0.9, top_k=50),
    "beams": dict(do_sample=False, num_beams=2),
}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """preset -> an export of a tiny model converted to it (softmax: the plain GPT-2 export)."""
    tokenizer, directories = gpt2_tokenizer(), {}
    model = OmegaConf.create(
        {"pretrained": None, "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}}
    )
    for preset in PRESETS:
        attention = OmegaConf.load(CONF / "attention" / f"{preset}.yaml")
        torch.manual_seed(0)
        net = build_model(model, attention, tokenizer).eval()
        with torch.no_grad():
            for name, p in net.named_parameters():
                if ".attn.core." in name:
                    p.add_(0.3 * torch.randn_like(p))
        directories[preset] = export(
            net, attention, tmp_path_factory.mktemp(preset) / "model", tokenizer=tokenizer
        )
    return directories


def batch(tokenizer):
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def generate(net, inputs, mode: str, **kwargs) -> torch.Tensor:
    set_seed(11)
    with torch.no_grad():
        return net.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=50256,
            **MODES[mode],
            **kwargs,
        )


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_without_a_cache_equals_recomputing_and_each_row_alone(exports, preset):
    net = AutoModelForCausalLM.from_pretrained(exports[preset], dtype=torch.float64).eval()
    assert isinstance(net, DFWForCausalLM) == (preset != "softmax")
    inputs = batch(gpt2_tokenizer())
    for mode in MODES:
        supplied = generate(net, inputs, mode)  # the model supplies its cache
        assert torch.equal(supplied, generate(net, inputs, mode, use_cache=False)), mode
    if preset != "softmax":  # an explicit cache still works
        assert torch.equal(
            generate(net, inputs, "greedy", cache=RecurrentCache(net)), generate(net, inputs, "greedy")
        )
    greedy, T = generate(net, inputs, "greedy"), inputs["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        alone = generate(net, gpt2_tokenizer()(prompt, return_tensors="pt"), "greedy")
        assert torch.equal(greedy[row, T:], alone[0, -NEW_TOKENS:]), f"row {row}"


@pytest.mark.parametrize("preset", PRESETS)
def test_the_text_generation_pipeline_equals_recomputing(exports, preset):
    pipe = pipeline("text-generation", model=str(exports[preset]), dtype=torch.float64, device="cpu")
    batch(pipe.tokenizer)  # left padding, as a batch needs
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=50256)
    for mode in MODES:
        outputs = []
        for use_cache in (True, False):  # True: the model supplies its cache; False: recomputing every step
            set_seed(11)
            outputs.append(pipe(PROMPTS, batch_size=2, use_cache=use_cache, **options, **MODES[mode]))
        assert outputs[0] == outputs[1], mode
    assert isinstance(pipe.model, DFWForCausalLM) == (preset != "softmax")
