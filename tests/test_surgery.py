"""Model surgery keeps every pretrained weight; softmax conversion is the unmodified model."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel

from dfw.attention import ConvertedAttention
from dfw.model import build_model
from tests.conftest import CONF, VocabTokenizer, save_tiny_gpt2


def _model_cfg(path):
    return OmegaConf.create({"name": "tiny", "pretrained": str(path), "tokenizer": "gpt2", "config": None})


def test_softmax_conversion_gives_the_hugging_face_logits(tmp_path):
    save_tiny_gpt2(tmp_path)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    converted = build_model(_model_cfg(tmp_path), OmegaConf.load(CONF / "attention/softmax.yaml"), VocabTokenizer()).eval()
    assert all(isinstance(block.attn, ConvertedAttention) for block in converted.transformer.h)
    input_ids = torch.randint(0, 97, (3, 50))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = converted(input_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_decay_conversion_keeps_pretrained_weights_and_adds_only_core_parameters(tmp_path):
    original = save_tiny_gpt2(tmp_path)
    attention = OmegaConf.merge(OmegaConf.load(CONF / "attention/decay.yaml"), {"state_size": 16})
    converted = build_model(_model_cfg(tmp_path), attention, VocabTokenizer())
    before, after = original.state_dict(), converted.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    new_keys = set(after) - set(before)
    assert new_keys and all(".attn.core." in key for key in new_keys)
    # Per layer: a 16 x 16 feature map per head, a key gate (C -> H*m) and a value gate (C -> H*d).
    H, d, C, m = 2, 16, 32, 16
    new_per_layer = H * m * d + (C * H * m + H * m) + (C * H * d + H * d)
    assert sum(after[k].numel() for k in new_keys) == 2 * new_per_layer


def test_an_exported_converted_model_is_rebuilt_with_its_new_parameters(tmp_path):
    from dfw.errors import ConfigError
    from dfw.model import export

    save_tiny_gpt2(tmp_path / "hf")
    attention = OmegaConf.merge(OmegaConf.load(CONF / "attention/decay.yaml"), {"state_size": 16})
    trained = build_model(_model_cfg(tmp_path / "hf"), attention, VocabTokenizer()).eval()
    with torch.no_grad():  # stand-in for fine-tuning: the new parameters move away from their init
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export(trained, attention, tmp_path / "export")
    rebuilt = build_model(_model_cfg(tmp_path / "export"), attention, VocabTokenizer()).eval()
    input_ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids, use_cache=False).logits, trained(input_ids, use_cache=False).logits)
    other = OmegaConf.create({"name": "linear", "_target_": "dfw.attention.FastWeightAttention", "_partial_": True})
    with pytest.raises(ConfigError, match="was converted to attention=decay"):
        build_model(_model_cfg(tmp_path / "export"), other, VocabTokenizer())
