"""Every attention preset converts a GPT-2 written by `save_pretrained` and trains through the real
Hydra config (`python -m dfw.train attention=<preset> model.pretrained=<dir> data=text ...`)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.model import build_model, load_exported
from dfw.train import train
from tests.attention.helpers import PRESETS
from tests.conftest import compose, tiny_overrides

GPT2_VOCAB = 50257  # data=text uses GPT-2's tokenizer (model.tokenizer=gpt2)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny random GPT-2, written as a pretrained checkpoint (head size 16)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=GPT2_VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", PRESETS)
def test_preset_converts_and_trains(name, pretrained_dir, tmp_path, text_files):
    extra = [f"attention={name}", f"model.pretrained={pretrained_dir}", "module.optimizer.lr=1e-3", "test=false"]
    extra += ["trainer.val_check_interval=4", "trainer.limit_val_batches=1"]  # validate at conversion and at the end
    cfg = compose(*tiny_overrides(tmp_path, text_files, *extra))
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/ppl"])
    assert metrics["val/ppl"] < metrics["val/ppl_converted"]  # training improved on the converted model

    # The export rebuilds the trained model: its new parameters moved away from their conversion
    # values; its random features are the ones drawn at conversion (4 steps < redraw interval).
    trained = load_exported(cfg.export_dir).eval()
    converted = build_model(cfg.model, cfg.attention, _Tokenizer()).eval()
    before, after = converted.state_dict(), trained.state_dict()
    core_keys = [key for key in before if ".attn.core." in key]
    assert set(core_keys) <= set(after)
    params = [key for key, _ in converted.named_parameters() if ".attn.core." in key]
    assert (not params) == (name in ("softmax", "linear", "performer"))
    if params:
        assert any(not torch.equal(before[key], after[key]) for key in params)
    for key in core_keys:
        if key.endswith("projection"):
            assert torch.equal(before[key], after[key])
    input_ids = torch.randint(0, GPT2_VOCAB, (1, 24))
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids, use_cache=False).logits).all()


class _Tokenizer:  # what build_model asks of a tokenizer
    eos_token_id = 0

    def __len__(self) -> int:
        return GPT2_VOCAB
