"""Model surgery keeps every pretrained weight; softmax keeps the unmodified GPT-2 attention."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from dfw.model import build_model
from dfw.surgery import model_size_metrics
from tests.conftest import CONF, VocabTokenizer, save_tiny_gpt2


def _model_cfg(path):
    return OmegaConf.create({"name": "tiny", "pretrained": str(path), "tokenizer": "gpt2", "config": None})


def test_softmax_is_gpt2_itself_in_training_and_with_padding(tmp_path):
    """attention=softmax converts nothing: every layer keeps transformers' GPT2Attention, so training mode
    draws the same attention dropout (attn_pdrop from the model config) for the same seed, and a left-padded
    batch is masked as GPT2LMHeadModel masks it."""
    # Attention dropout only (residual and embedding dropout off): train mode differs from eval by it alone.
    save_tiny_gpt2(tmp_path, attn_pdrop=0.3, resid_pdrop=0.0, embd_pdrop=0.0)
    reference = GPT2LMHeadModel.from_pretrained(tmp_path)
    softmax_node = OmegaConf.load(CONF / "attention/softmax.yaml")
    softmax = build_model(_model_cfg(tmp_path), softmax_node, VocabTokenizer())
    assert all(isinstance(block.attn, GPT2Attention) for block in softmax.transformer.h)
    assert softmax.state_dict().keys() == reference.state_dict().keys()
    input_ids = torch.randint(0, 97, (3, 50))
    logits = {}
    for name, net in (("reference", reference), ("softmax", softmax)):
        torch.manual_seed(7)
        logits[name] = net.train()(input_ids).logits
    assert torch.equal(logits["softmax"], logits["reference"])
    with torch.no_grad():
        eval_logits = softmax.eval()(input_ids).logits
        assert (logits["softmax"] - eval_logits).abs().max() > 1e-2  # attention dropout acted
    mask = torch.ones_like(input_ids)
    mask[0, :20], mask[1, :3] = 0, 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = reference.eval()(input_ids, attention_mask=mask, position_ids=positions).logits
        actual = softmax(input_ids, attention_mask=mask, position_ids=positions).logits
        alone = softmax(input_ids[:1, 20:]).logits
    assert torch.equal(actual, expected)
    torch.testing.assert_close(actual[0, 20:], alone[0], rtol=1e-5, atol=1e-5)


def test_model_size_metrics_count_the_kv_cache_of_softmax_and_the_state_of_a_conversion(tmp_path):
    save_tiny_gpt2(tmp_path)
    softmax_node = OmegaConf.load(CONF / "attention/softmax.yaml")
    softmax = build_model(_model_cfg(tmp_path), softmax_node, VocabTokenizer())
    decay = build_model(_model_cfg(tmp_path), OmegaConf.load(CONF / "attention/decay.yaml"), VocabTokenizer())
    kv = 2 * 2 * 32 * 48 * 4  # keys and values, 2 layers, width 32, 48 tokens, float32
    assert model_size_metrics(softmax, 48) == {"model/state_bytes_per_sequence": kv, "model/params_new": 0}
    state = 2 * 2 * 16 * 16 * 4  # 2 layers, 2 heads, m = head size = 16, x 16, float32
    metrics = model_size_metrics(decay, 48)
    assert metrics["model/state_bytes_per_sequence"] == state and metrics["model/state_size"] == 16


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
        torch.testing.assert_close(
            rebuilt(input_ids, use_cache=False).logits, trained(input_ids, use_cache=False).logits
        )
    other = OmegaConf.create(
        {"name": "linear", "_target_": "dfw.attention.FastWeightAttention", "_partial_": True}
    )
    with pytest.raises(ConfigError, match="was converted to attention=decay"):
        build_model(_model_cfg(tmp_path / "export"), other, VocabTokenizer())
