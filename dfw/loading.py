"""Every way a model comes into dfw, in one place: `load_model(source)`.

    source                                  kind          what is built
    a hub id (gpt2, gpt2-medium, ...)       "hub"         a softmax GPT-2 (offline: from the local cache)
    a Hugging Face directory                "hf_dir"      a softmax GPT-2
    a directory exported by dfw.train       "export"      the converted model it holds (see below)
    a .ckpt written by dfw.train            "checkpoint"  the model of its stored run config, its weights

An export is a Hugging Face directory (`save_pretrained`: config.json, model.safetensors, tokenizer files).
A converted model's config.json has dfw's own model type (`dfw-gpt2`, `dfw.hf`) and holds the attention
config it was converted with, so it is rebuilt without the training config (and by `AutoModelForCausalLM`
once `dfw` is imported). A softmax model is exported as the plain GPT-2 it is, with `dfw_attention.yaml`
(name: softmax) beside it. Exports written by earlier versions (model_type gpt2 plus `dfw_attention.yaml`)
still load (CHANGELOG.md lists the versions). A checkpoint is read as data only (`read_checkpoint`,
`weights_only=True`: the one checkpoint reader of dfw), and every stored config is checked before anything
is built from it (`dfw.safe_config`).

Building a model from a training config and exporting one are `dfw.model`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from .errors import ConfigError, error_summary
from .hf import ATTENTION_FILE, MODEL_TYPE, DFWForCausalLM, as_dfw_model
from .hub import check_hub_or_cache
from .safe_config import build_checked, plain
from .surgery import convert_to

STAGE_KEY = "dfw_stage"  # in a checkpoint: "transfer" for one taken inside the transfer stage (dfw.transfer)


@dataclass
class LoadedModel:
    """What `load_model` found at `source`."""

    net: GPT2LMHeadModel  # a plain GPT2LMHeadModel for softmax, converted (dfw.surgery) otherwise
    tokenizer: PreTrainedTokenizerBase  # the source's own, else GPT-2's
    attention: (
        dict[str, Any] | None
    )  # the stored attention config of a converted model; None: plain softmax GPT-2
    kind: Literal["hub", "hf_dir", "export", "checkpoint"]
    source: str  # as given


def load_model(source: str, option: str = "model") -> LoadedModel:
    """The model and tokenizer that `source` names (the table in this module's docstring).

    A softmax model (a hub id, a Hugging Face directory, a softmax export or checkpoint) is always a plain
    `GPT2LMHeadModel` (same weights, transformers' KV cache). `option` names the setting in error messages.
    """
    path = Path(source).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(
                f"{option}={source!r}: no such checkpoint; pass an existing .ckpt (e.g. "
                "<run>/checkpoints/last.ckpt)"
            )
        return _from_checkpoint(path, option)
    attention = saved_attention(path) if path.is_dir() else None
    if attention is not None and attention.get("name") != "softmax":
        net, stored = load_exported(path), attention
    else:
        net, stored = from_pretrained(source, option=option), None
    kind = "export" if attention is not None else "hf_dir" if _looks_local(source) else "hub"
    return LoadedModel(net, _tokenizer_of(path), stored, kind, source)


def _tokenizer_of(path: Path) -> PreTrainedTokenizerBase:
    from .data.tokenizers import gpt2_tokenizer, load_tokenizer

    return load_tokenizer(str(path), None, None) if (path / "tokenizer.json").is_file() else gpt2_tokenizer()


def _looks_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_absolute() or source.startswith((".", "~")) or path.exists()


def from_pretrained(source: str, option: str = "model.pretrained") -> GPT2LMHeadModel:
    """GPT2LMHeadModel.from_pretrained with errors that name `option` and say what to do."""
    path = Path(source).expanduser()
    looks_local = _looks_local(source)
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
            raise ConfigError(
                f"{option}={source!r}: could not read the model ({error_summary(err)})"
            ) from None
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


def load_exported(directory: str | Path) -> GPT2LMHeadModel:
    """Rebuild a converted model from `export` output (weights, config and attention config).

    Also reads exports of earlier versions (model_type gpt2 with `dfw_attention.yaml`).
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    attention = saved_attention(directory)
    if attention is None:
        raise ConfigError(
            f"{directory} has no {ATTENTION_FILE} and no {MODEL_TYPE} config: not a model exported by dfw"
        )
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
    weights = directory / "model.safetensors"

    def read_weights() -> dict[str, torch.Tensor]:
        try:
            return load_file(str(weights))
        except Exception as err:
            raise ConfigError(
                f"{weights}: cannot be read, it may be truncated or corrupt ({error_summary(err)}); export "
                "it again"
            ) from None

    return _rebuild(net, attention, str(directory / ATTENTION_FILE), read_weights, str(directory))


def _rebuild(
    net: GPT2LMHeadModel,
    attention: dict[str, Any] | None,
    attention_source: str,
    read_weights: Callable[[], dict[str, torch.Tensor]],
    weights_source: str,
) -> GPT2LMHeadModel:
    """The rest of rebuilding a stored model (an old-format export, a checkpoint) once its GPT-2 is built:
    every layer converted to the stored `attention` (checked first; None: softmax), then its weights."""
    if attention is None:
        return load_weights(net, read_weights(), weights_source)
    convert_to(net, attention, source=attention_source)
    # as a DFWForCausalLM, as a new export loads: its generate supplies a RecurrentCache (dfw.hf)
    return as_dfw_model(load_weights(net, read_weights(), weights_source), attention)


def load_weights(net: GPT2LMHeadModel, state: dict[str, torch.Tensor], source: str) -> GPT2LMHeadModel:
    """Every weight of `net` from `state` (lm_head.weight may be absent: it is tied to the embedding)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})"
        )
    net.tie_weights()
    return net


# --- Checkpoints ------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, option: str, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path` as data: torch.load(weights_only=True), one ConfigError (naming `option`) for
    what is not a checkpoint. `mmap`: map the tensors from the file instead of reading them."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{option}={str(path)!r} does not exist; pass the path of a .ckpt file") from None
    except Exception as err:
        reason = error_summary(err)
        if "Unsupported global" in str(err):
            reason = "it holds pickled Python objects, not only data; dfw does not load those"
        elif "weights_only" in str(err) or "Weights only load failed" in str(err):
            reason = "it is not a checkpoint file (unreadable as one: damaged, or something else)"
        raise ConfigError(
            f"{option}={str(path)!r} cannot be loaded as a checkpoint ({reason}); pass a .ckpt written by "
            "dfw.train (a truncated file cannot be repaired: use another checkpoint, e.g. last.ckpt or "
            "best-*.ckpt)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{option}={str(path)!r} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by "
            "dfw.train"
        )
    return checkpoint


def checkpoint_stage(ckpt_path: str | None) -> str | None:
    """None without a checkpoint; "transfer" for one taken inside the transfer stage; else "finetune"."""
    if not ckpt_path:
        return None
    return read_checkpoint(Path(ckpt_path).expanduser(), "ckpt_path", mmap=True).get(STAGE_KEY, "finetune")


def _from_checkpoint(path: Path, option: str) -> LoadedModel:
    from lightning import LightningDataModule

    from .data.tokenizers import gpt2_tokenizer

    checkpoint = read_checkpoint(path, option)
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or not isinstance(checkpoint.get("model_config"), dict):
        raise ConfigError(
            f"{option}={str(path)!r} has no run config or model config: not a checkpoint written by dfw.train"
        )
    attention, data = config.get("attention") or {}, config.get("data") or {}
    spec = (config.get("model") or {}).get("tokenizer") or "gpt2"
    source = f"{path} (stored run config)"
    # gpt2 and saved directories need no corpus; bpe-<N> is found through the run's data config.
    tokenizer = (
        gpt2_tokenizer()
        if spec == "gpt2"
        else build_checked(data, LightningDataModule, source, "data").tokenizer
    )
    weights = {
        key.removeprefix("net."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("net.")
    }
    try:
        net = GPT2LMHeadModel(GPT2Config.from_dict(checkpoint["model_config"]))
    except Exception as err:
        raise ConfigError(
            f"{option}={str(path)!r}: the stored model config is not a GPT-2 config ({err})"
        ) from None
    stored = attention if attention.get("name") != "softmax" else None
    net = _rebuild(net, stored, source, lambda: weights, f"{option}={str(path)!r}")
    return LoadedModel(net, tokenizer, stored, "checkpoint", str(path))
