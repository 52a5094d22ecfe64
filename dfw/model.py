"""Building converted GPT-2 models from a training config, and exporting them.

`build_model` is what `dfw.train` trains: pretrained GPT-2 (a hub id or a directory, Hugging Face or
exported by dfw) or a freshly initialised one, with every layer's attention converted (`dfw.surgery`).
`export` writes a directory that every loader rebuilds without the training config; what an export holds
and how each kind of source becomes a model is `dfw.loading`'s (its docstring; CHANGELOG.md for the
export format's versions).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from .errors import ConfigError
from .hf import ATTENTION_FILE, as_dfw_model
from .loading import from_pretrained, load_exported, load_weights, saved_attention
from .surgery import convert_to, core_factory

# Their old import paths (`from dfw.model import load_exported`, ...) keep working.
__all__ = [
    "ATTENTION_FILE",
    "build_model",
    "core_factory",
    "export",
    "from_pretrained",
    "load_exported",
    "load_weights",
    "saved_attention",
]

log = logging.getLogger(__name__)


def build_model(model: DictConfig, attention: DictConfig, tokenizer: Any) -> GPT2LMHeadModel:
    """GPT-2 (pretrained or freshly initialised) with every layer's attention converted (but those
    `attention.softmax_layers` keeps softmax in, `dfw.surgery.softmax_layers`).

    `model.pretrained`: a hub id or a directory (Hugging Face, or exported by dfw); None builds a
    random model from `model.config` (GPT2Config fields) with the tokenizer's vocabulary.
    """
    vocab_size = len(tokenizer)
    if model.get("pretrained"):
        saved = (
            saved_attention(model.pretrained) if Path(str(model.pretrained)).expanduser().is_dir() else None
        )
        if saved is not None and saved.get("name") != "softmax":
            # A dfw export: rebuild its attention with the stored config, then load the new parameters too.
            if saved.get("name") != attention.get("name"):
                raise ConfigError(
                    f"model.pretrained={model.pretrained!r} was converted to attention={saved.get('name')}, "
                    f"not attention={attention.get('name')}; pass attention={saved.get('name')} or start "
                    "from a softmax checkpoint"
                )
            return load_exported(model.pretrained)
        net = from_pretrained(str(model.pretrained))
    else:
        fields = OmegaConf.to_container(model.config, resolve=True) if model.get("config") else {}
        eos = tokenizer.eos_token_id
        net = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, **fields))
    if net.config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.tokenizer has {vocab_size} tokens but the model's vocabulary has "
            f"{net.config.vocab_size}; use the model's own tokenizer (model.tokenizer)"
        )
    convert_to(net, attention)
    return net


def export(
    net: GPT2LMHeadModel,
    attention: DictConfig | dict,
    directory: str | Path,
    tokenizer: Any = None,
    weights: str = "final",
    step: int | None = None,
) -> Path:
    """Write a directory that `build_model(model.pretrained=<dir>)`, `load_exported` and, with dfw
    imported, `AutoModelForCausalLM.from_pretrained` rebuild.

    `weights` ("final" or "best") and `step` say which weights these are; they go into config.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    node = (
        OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
    )
    metadata = {"exported_weights": weights, "exported_step": step}
    if node.get("name") == "softmax":
        # A softmax model is a plain GPT-2: any transformers loads it as what it is.
        for key, value in metadata.items():
            setattr(net.config, key, value)
        net.save_pretrained(directory)
        OmegaConf.save(OmegaConf.create(node), directory / ATTENTION_FILE)
    else:
        as_dfw_model(net, node, **metadata).save_pretrained(directory)
        (directory / ATTENTION_FILE).unlink(missing_ok=True)  # from an earlier export into this directory
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    log.info("exported the model (%s weights, step %s) to %s", weights, step, directory)
    return directory
