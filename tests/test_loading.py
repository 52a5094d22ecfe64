"""`dfw.loading.load_model`: every kind of source becomes the model it holds, with what it says about
itself."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel

from dfw.attention import ConvertedAttention
from dfw.data.tokenizers import gpt2_tokenizer
from dfw.generate import is_converted
from dfw.loading import STAGE_KEY, checkpoint_stage, load_model, read_checkpoint
from dfw.model import build_model, export
from tests.conftest import CONF, VocabTokenizer, save_tiny_gpt2


def _converted(tmp_path, preset: str):
    save_tiny_gpt2(tmp_path / "hf")
    model = OmegaConf.create(
        {"name": "tiny", "pretrained": str(tmp_path / "hf"), "tokenizer": "gpt2", "config": None}
    )
    attention = OmegaConf.load(CONF / "attention" / f"{preset}.yaml")
    return build_model(model, attention, VocabTokenizer()).eval(), attention


def _same_logits(a, b) -> None:
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            a.eval()(ids, use_cache=False).logits, b.eval()(ids, use_cache=False).logits
        )


def test_a_hugging_face_directory_is_a_plain_softmax_gpt2(tmp_path):
    original = save_tiny_gpt2(tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"))
    assert (loaded.kind, loaded.attention, loaded.source) == ("hf_dir", None, str(tmp_path / "hf"))
    assert type(loaded.net) is GPT2LMHeadModel and not is_converted(loaded.net)
    _same_logits(loaded.net, original)


def test_exports_of_a_converted_and_a_softmax_model(tmp_path):
    net, attention = _converted(tmp_path, "decay")
    loaded = load_model(str(export(net, attention, tmp_path / "decay", tokenizer=gpt2_tokenizer())))
    assert loaded.kind == "export" and loaded.attention["name"] == "decay"
    assert isinstance(loaded.net.transformer.h[0].attn, ConvertedAttention)
    assert len(loaded.tokenizer) == len(gpt2_tokenizer())
    _same_logits(loaded.net, net)

    softmax, attention = _converted(tmp_path / "s", "softmax")
    loaded = load_model(str(export(softmax, attention, tmp_path / "softmax")))
    assert (loaded.kind, loaded.attention) == ("export", None)
    assert not is_converted(loaded.net)
    _same_logits(loaded.net, softmax)


def _checkpoint(tmp_path, net, attention, **extra):
    """What dfw.train's checkpoints hold for loading: the run config, the model config and `net.*` weights."""
    config = {"attention": OmegaConf.to_container(attention), "model": {"tokenizer": "gpt2"}, "data": {}}
    state = {
        "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
        "hyper_parameters": {"config": config},
        "model_config": net.config.to_dict(),
        **extra,
    }
    torch.save(state, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_a_checkpoint_is_rebuilt_from_its_stored_configs(tmp_path):
    net, attention = _converted(tmp_path, "decay")
    path = _checkpoint(tmp_path, net, attention)
    loaded = load_model(str(path))
    assert loaded.kind == "checkpoint" and loaded.attention["name"] == "decay"
    _same_logits(loaded.net, net)
    assert checkpoint_stage(str(path)) == "finetune" and checkpoint_stage(None) is None
    assert read_checkpoint(path, "ckpt_path").keys() >= {"state_dict", "model_config"}


def test_the_stage_a_checkpoint_was_taken_in(tmp_path):
    net, attention = _converted(tmp_path, "softmax")
    path = _checkpoint(tmp_path, net, attention, **{STAGE_KEY: "transfer"})
    assert checkpoint_stage(str(path)) == "transfer"
    loaded = load_model(str(path))
    assert (loaded.kind, loaded.attention) == ("checkpoint", None) and not is_converted(loaded.net)
