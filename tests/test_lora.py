"""LoRA fine-tuning through peft (dfw/lora.py): what trains, and exports that merge and reload exactly."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from dfw.errors import ConfigError
from dfw.lora import apply_lora, merged
from dfw.model import core_factory, export, load_exported
from dfw.train import train
from tests.attention.helpers import preset
from tests.conftest import compose, tiny_overrides

LORA = OmegaConf.create({"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["c_attn", "c_proj", "c_fc"]})


def _converted_decay() -> tuple[GPT2LMHeadModel, dict]:
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    from dfw.surgery import convert_attention

    attention = OmegaConf.to_container(preset("decay", state_size=16))
    convert_attention(net, core_factory(attention))
    return net.eval(), attention


def test_lora_trains_adapters_and_new_attention_parameters_only():
    net, _ = _converted_decay()
    peft_net = apply_lora(net, LORA)
    trainable = {name for name, p in peft_net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".attn.core." in name for name in trainable)
    assert any(".attn.core." in name for name in trainable)
    # Every Conv1D named in targets has adapters: 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj).
    assert sum("lora_A" in name for name in trainable) == 2 * 4


def test_lora_export_merges_and_reloads_to_identical_logits(tmp_path):
    net, attention = _converted_decay()
    peft_net = apply_lora(net, LORA)
    with torch.no_grad():
        for name, p in peft_net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: without this the adapters would do nothing
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_net(input_ids=ids).logits
        base = merged(apply_lora(_converted_decay()[0], LORA))(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapters change the model
    export(merged(peft_net), attention, tmp_path / "export")
    reloaded = load_exported(tmp_path / "export").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in key for key in reloaded.state_dict())


def test_lora_through_the_config_exports_a_plain_model(tmp_path, text_files):
    cfg = compose(
        *tiny_overrides(
            tmp_path, text_files, "attention=decay", "lora.rank=2", "test=false", "trainer.max_steps=2"
        )
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/ppl"]))
    net = load_exported(tmp_path / "run" / "model")
    # The converted model as dfw exports it (its own model type), with the adapters merged away.
    assert type(net).__name__ == "DFWForCausalLM"
    assert not any("lora" in key for key in net.state_dict())


def test_lora_targets_that_match_nothing_raise_one_clear_error():
    net, _ = _converted_decay()
    with pytest.raises(ConfigError, match=r"lora.targets=\['q_proj'\]: no module named \['q_proj'\]"):
        apply_lora(net, OmegaConf.merge(LORA, {"targets": ["q_proj"]}))
