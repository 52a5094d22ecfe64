"""Every attention preset converts a GPT-2 written by `save_pretrained` and trains through the real
Hydra config (`python -m dfw.train attention=<preset> model.pretrained=<dir> data=text ...`)."""

from __future__ import annotations

import math

import pytest
import torch

from dfw.model import build_model, load_exported
from dfw.train import train
from tests.attention.helpers import PRESETS
from tests.conftest import GPT2_VOCAB, VocabTokenizer, compose, save_tiny_gpt2, tiny_overrides


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's vocabulary, written as a pretrained checkpoint (head size 16)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_gpt2(path, vocab_size=GPT2_VOCAB, bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_converts_and_trains(name, pretrained_dir, tmp_path, text_files):
    extra = [
        f"attention={name}",
        f"model.pretrained={pretrained_dir}",
        "module.optimizer.lr=1e-3",
        "test=false",
    ]
    extra += [
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
    ]  # validate at conversion and at the end
    cfg = compose(*tiny_overrides(tmp_path, text_files, *extra))
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/ppl"])
    assert metrics["val/ppl"] < metrics["val/ppl_converted"]  # training improved on the converted model

    # The export rebuilds the trained model: its new parameters moved away from their conversion
    # values; its random features are the ones drawn at conversion (4 steps < redraw interval).
    trained = load_exported(cfg.export_dir).eval()
    attn = trained.transformer.h[0].attn  # softmax: GPT-2's own attention, not converted
    expected = ("GPT2Attention", None) if name == "softmax" else ("ConvertedAttention", "FastWeightAttention")
    assert (type(attn).__name__, type(attn.core).__name__ if hasattr(attn, "core") else None) == expected
    converted = build_model(cfg.model, cfg.attention, VocabTokenizer(GPT2_VOCAB)).eval()
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
