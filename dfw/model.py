"""Building, loading and exporting converted GPT-2 models.

An exported model is a Hugging Face directory (`save_pretrained`: config.json, model.safetensors,
tokenizer files) plus `dfw_attention.yaml`, the attention config it was converted with, so it can be
rebuilt without the training config. A plain Hugging Face directory or hub id (no such file) is a
softmax model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from .errors import ConfigError, instantiate
from .surgery import convert_attention

log = logging.getLogger(__name__)

ATTENTION_FILE = "dfw_attention.yaml"


def core_factory(attention: DictConfig | dict):
    """The `conf/attention/*.yaml` node -> a callable that builds one layer's core."""
    node = OmegaConf.create(OmegaConf.to_container(attention, resolve=True) if isinstance(attention, DictConfig) else attention)
    node.pop("name", None)
    return instantiate(node)


def from_pretrained(source: str, option: str = "model.pretrained") -> GPT2LMHeadModel:
    """GPT2LMHeadModel.from_pretrained with errors that name `option` and say what to do."""
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(
            f"{option}={source!r}: no Hugging Face checkpoint there (config.json missing); "
            "pass a directory written by save_pretrained or by dfw's export, or a hub id such as gpt2"
        )
    try:
        return GPT2LMHeadModel.from_pretrained(str(path) if looks_local else source, torch_dtype=torch.float32)
    except OSError as err:
        raise ConfigError(
            f"{option}={source!r}: could not load it from the Hugging Face hub or its local cache "
            f"({str(err).splitlines()[0][:160]}). Download it once with network access (it is then cached), "
            f"or pass {option}=<local directory>"
        ) from None


def saved_attention(source: str | Path) -> DictConfig | None:
    """The attention config stored with an exported model, or None for a plain Hugging Face model."""
    file = Path(source).expanduser() / ATTENTION_FILE
    return OmegaConf.load(file) if file.is_file() else None


def build_model(model: DictConfig, attention: DictConfig, tokenizer: Any) -> GPT2LMHeadModel:
    """GPT-2 (pretrained or freshly initialised) with every layer's attention converted.

    `model.pretrained`: a hub id or a directory (Hugging Face, or exported by dfw); None builds a
    random model from `model.config` (GPT2Config fields) with the tokenizer's vocabulary.
    """
    vocab_size = len(tokenizer)
    if model.get("pretrained"):
        saved = saved_attention(model.pretrained) if Path(str(model.pretrained)).expanduser().is_dir() else None
        if saved is not None and saved.get("name") != "softmax":
            # A dfw export: rebuild its attention with the stored config, then load the new parameters too.
            if saved.get("name") != attention.get("name"):
                raise ConfigError(
                    f"model.pretrained={model.pretrained!r} was converted to attention={saved.get('name')}, "
                    f"not attention={attention.get('name')}; pass attention={saved.get('name')} or start from a "
                    "softmax checkpoint"
                )
            return load_exported(model.pretrained)
        net = from_pretrained(str(model.pretrained))
    else:
        fields = OmegaConf.to_container(model.config, resolve=True) if model.get("config") else {}
        eos = tokenizer.eos_token_id
        net = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, **fields))
    if net.config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.tokenizer has {vocab_size} tokens but the model's vocabulary has {net.config.vocab_size}; "
            "use the model's own tokenizer (model.tokenizer)"
        )
    convert_attention(net, core_factory(attention))
    return net


def load_exported(directory: str | Path) -> GPT2LMHeadModel:
    """Rebuild a converted model from `export` output (weights, config and attention config)."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    attention = saved_attention(directory)
    if attention is None:
        raise ConfigError(f"{directory} has no {ATTENTION_FILE}: not a model exported by dfw")
    net = GPT2LMHeadModel(GPT2Config.from_pretrained(directory))
    convert_attention(net, core_factory(attention))
    return load_weights(net, load_file(str(directory / "model.safetensors")), str(directory))


def load_weights(net: GPT2LMHeadModel, state: dict[str, torch.Tensor], source: str) -> GPT2LMHeadModel:
    """Every weight of `net` from `state` (lm_head.weight may be absent: it is tied to the embedding)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    net.tie_weights()
    return net


def export(net: GPT2LMHeadModel, attention: DictConfig | dict, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a directory that `build_model(model.pretrained=<dir>)` and `load_exported` rebuild."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(directory)
    node = attention if isinstance(attention, DictConfig) else OmegaConf.create(attention)
    OmegaConf.save(node, directory / ATTENTION_FILE, resolve=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    log.info("exported the model to %s", directory)
    return directory
