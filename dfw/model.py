"""Building, loading and exporting converted GPT-2 models.

An exported model is a Hugging Face directory (`save_pretrained`: config.json, model.safetensors,
tokenizer files). A converted model's config.json has dfw's own model type (`dfw-gpt2`, see `dfw.hf`)
and holds the attention config it was converted with, so it is rebuilt without the training config,
also by `AutoModelForCausalLM` once `dfw` is imported. A softmax model is exported as the plain GPT-2
it is, with `dfw_attention.yaml` (name: softmax) beside it. Exports written by earlier versions
(model_type gpt2 plus `dfw_attention.yaml`) still load. A plain Hugging Face directory or hub id is a
softmax model. Stored attention configs are checked before use (`dfw.safe_config`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from .attention import AttentionCore
from .checkpointing import error_summary
from .errors import ConfigError, instantiate
from .hf import MODEL_TYPE, DFWForCausalLM, as_dfw_model
from .hub import check_hub_or_cache
from .safe_config import build_checked, check_options, plain
from .surgery import convert_attention

log = logging.getLogger(__name__)

ATTENTION_FILE = "dfw_attention.yaml"


def core_factory(attention: DictConfig | dict, source: str | None = None):
    """The `conf/attention/*.yaml` node -> a callable that builds one layer's core.

    `source`: the file the node was read from (an export, a checkpoint). Such a node is checked
    against dfw's own attention classes and options and built without Hydra (`dfw.safe_config`).
    A node of the run's own config is built by Hydra; an option its class does not take is one
    ConfigError naming it.
    """
    if source is not None:
        return build_checked(attention, AttentionCore, source, "attention")
    node = OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
    node.pop("name", None)
    if isinstance(node.get("_target_"), str):
        try:
            target = get_object(node["_target_"])
        except Exception:  # Hydra's instantiate below reports a target it cannot find
            target = None
        if callable(target):
            check_options(target, node, "attention")
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
    if not looks_local:
        check_hub_or_cache(source, option)  # no minute of retries when the hub is unreachable
    try:
        return GPT2LMHeadModel.from_pretrained(str(path) if looks_local else source, dtype=torch.float32)
    except OSError as err:
        if looks_local:
            raise ConfigError(f"{option}={source!r}: could not read the model ({error_summary(err)})") from None
        raise ConfigError(
            f"{option}={source!r}: could not load it from the Hugging Face hub or its local cache "
            f"({error_summary(err)[:160]}). Download it once with network access (it is then cached), "
            f"or pass {option}=<local directory>"
        ) from None
    except Exception as err:  # a truncated or corrupt weights file (safetensors raises its own errors)
        if not looks_local:
            raise
        raise ConfigError(
            f"{option}={source!r}: the weights there cannot be read, the file may be truncated or corrupt "
            f"({error_summary(err)}); export or download it again"
        ) from None


def _config_json(directory: Path) -> dict[str, Any] | None:
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file}: not a readable JSON config ({error_summary(err)})") from None


def saved_attention(source: str | Path) -> dict[str, Any] | None:
    """The attention config stored with an exported model (plain data, not yet checked), or None
    for a plain Hugging Face model."""
    directory = Path(source).expanduser()
    config = _config_json(directory)
    if config is not None and config.get("model_type") == MODEL_TYPE:
        return dict(config.get("attention") or {})
    file = directory / ATTENTION_FILE
    if not file.is_file():
        return None
    try:
        node = plain(OmegaConf.load(file))
    except Exception as err:
        raise ConfigError(f"{file}: not a readable YAML file ({error_summary(err)})") from None
    if not isinstance(node, dict):
        raise ConfigError(f"{file}: expected a mapping of attention options")
    return node


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
    """Rebuild a converted model from `export` output (weights, config and attention config).

    Also reads exports of earlier versions (model_type gpt2 with `dfw_attention.yaml`).
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    attention = saved_attention(directory)
    if attention is None:
        raise ConfigError(f"{directory} has no {ATTENTION_FILE} and no {MODEL_TYPE} config: not a model exported by dfw")
    config = _config_json(directory) or {}
    if config.get("model_type") == MODEL_TYPE:
        try:
            return DFWForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(
                f"{directory}: the exported model cannot be read, a file may be truncated or corrupt "
                f"({error_summary(err)}); export it again"
            ) from None
    try:
        net = GPT2LMHeadModel(GPT2Config.from_pretrained(directory))
    except Exception as err:
        raise ConfigError(f"{directory / 'config.json'}: not a GPT-2 config ({error_summary(err)})") from None
    convert_attention(net, core_factory(attention, source=str(directory / ATTENTION_FILE)))
    weights = directory / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise ConfigError(
            f"{weights}: cannot be read, it may be truncated or corrupt ({error_summary(err)}); export it again"
        ) from None
    return load_weights(net, state, str(directory))


def load_weights(net: GPT2LMHeadModel, state: dict[str, torch.Tensor], source: str) -> GPT2LMHeadModel:
    """Every weight of `net` from `state` (lm_head.weight may be absent: it is tied to the embedding)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    net.tie_weights()
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
    node = OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
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
