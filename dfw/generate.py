"""Generate text: `python -m dfw.generate model=<exported dir | .ckpt | hub id> prompt="..."`.

Loads the model (see `load_for_generation`), streams the continuation to the terminal, and reports
tokens per second and the memory the cache holds at the end: a converted model decodes with
`dfw.cache.RecurrentCache` (a fixed-size state per layer; on a GPU its decode step is replayed from a
CUDA graph, `cuda_graph=true`), a softmax model with transformers' KV cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from lightning import LightningDataModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    TextStreamer,
    set_seed,
)
from transformers.generation.streamers import BaseStreamer

import dfw  # noqa: F401  (registers the config resolvers)

from .attention import ConvertedAttention
from .cache import RecurrentCache, cache_bytes
from .checkpointing import load_checkpoint
from .config import auto_precision
from .data.tokenizers import gpt2_tokenizer, load_tokenizer
from .errors import ConfigError, run_or_exit
from .hf import DFWForCausalLM, as_dfw_model
from .model import core_factory, from_pretrained, load_exported, load_weights, saved_attention
from .safe_config import build_checked
from .surgery import convert_attention

log = logging.getLogger(__name__)



def load_for_generation(source: str) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """The model and tokenizer that `source` names.

    - a `.ckpt` written by `dfw.train`: its stored run config rebuilds the model (no training config needed);
    - a directory exported by `dfw.train` (`dfw_attention.yaml` beside the Hugging Face files);
    - a Hugging Face directory or hub id: a softmax GPT-2 (offline, the hub id must be in the local cache).
    A softmax model is always returned as a plain `GPT2LMHeadModel` (same weights, transformers' KV cache), a
    converted one as a `DFWForCausalLM` (its generate supplies a RecurrentCache and runs dfw's decode step).
    """
    path = Path(source).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise ConfigError(
                f"model={source!r}: no such checkpoint; pass an existing .ckpt (e.g. <run>/checkpoints/last.ckpt)"
            )
        return _from_checkpoint(path)
    attention = saved_attention(path) if path.is_dir() else None
    if attention is not None and attention.get("name") != "softmax":
        net = load_exported(path)
        if not isinstance(net, DFWForCausalLM):  # an export of an earlier version
            net = as_dfw_model(net, attention)
    else:
        net = from_pretrained(source, option="model")
    tokenizer = (
        load_tokenizer(str(path), None, None) if (path / "tokenizer.json").is_file() else gpt2_tokenizer()
    )
    return net, tokenizer


def _from_checkpoint(path: Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    # Data only (weights_only=True); the stored configs are checked before anything is built from them.
    checkpoint = load_checkpoint(path, "model")
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(config, dict) or not isinstance(checkpoint.get("model_config"), dict):
        raise ConfigError(
            f"model={str(path)!r} has no run config or model config: not a checkpoint written by dfw.train"
        )
    attention, data = config.get("attention") or {}, config.get("data") or {}
    spec = (config.get("model") or {}).get("tokenizer") or "gpt2"
    source = f"{path} (stored run config)"
    # gpt2 and saved directories need no corpus; bpe-<N> is found through the run's data config.
    tokenizer = gpt2_tokenizer() if spec == "gpt2" else build_checked(data, LightningDataModule, source, "data").tokenizer
    weights = {
        key.removeprefix("net."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("net.")
    }
    try:
        net = GPT2LMHeadModel(GPT2Config.from_dict(checkpoint["model_config"]))
    except Exception as err:
        raise ConfigError(f"model={str(path)!r}: the stored model config is not a GPT-2 config ({err})") from None
    if attention.get("name") == "softmax":
        return load_weights(net, weights, f"model={str(path)!r}"), tokenizer
    convert_attention(net, core_factory(attention, source=source))
    return as_dfw_model(load_weights(net, weights, f"model={str(path)!r}"), attention), tokenizer


def is_converted(net: torch.nn.Module) -> bool:
    return any(isinstance(module, ConvertedAttention) for module in net.modules())


class _Clock(BaseStreamer):
    """Times generation from the first new token on (decode speed, without the prompt), optionally printing."""

    def __init__(self, printer: TextStreamer | None = None):
        self.printer, self.calls, self.first_token_at, self.end_at = printer, 0, None, None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1  # the first call is the prompt, then one call per generated token
        if self.calls == 2:
            self.first_token_at = time.perf_counter()
        if self.printer is not None:
            self.printer.put(value)

    def end(self) -> None:
        self.end_at = time.perf_counter()
        if self.printer is not None:
            self.printer.end()


def _device_and_dtype(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    name = cfg.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and auto_precision() == "bf16-mixed" else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return device, getattr(torch, name)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Load, generate, print; returns the texts (prompt + continuation) and the measurements."""
    device, dtype = _device_and_dtype(cfg)
    net, tokenizer = load_for_generation(str(cfg.model))
    net = net.to(device=device, dtype=dtype).eval()
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [str(cfg.prompt)]
    tokenizer.padding_side = "left"  # decoder-only generation: pads before the prompt (see dfw.cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    prompt_length = batch["input_ids"].shape[1]
    if prompt_length + cfg.max_new_tokens > net.config.n_positions:
        raise ConfigError(
            f"prompt ({prompt_length} tokens) + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"{net.config.n_positions} learned positions; lower max_new_tokens"
        )
    converted = is_converted(net)
    if not isinstance(cfg.cuda_graph, bool):
        raise ConfigError(f"cuda_graph must be true or false, got {cfg.cuda_graph!r}")
    cache = RecurrentCache(net, cuda_graph=cfg.cuda_graph) if converted else DynamicCache(config=net.config)
    sampling = cfg.temperature > 0
    options = (
        dict(do_sample=sampling, temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
        if sampling
        else dict(do_sample=False)
    )
    clock = _Clock(TextStreamer(tokenizer) if len(prompts) == 1 else None)

    set_seed(cfg.seed)
    with torch.inference_mode():
        output = net.generate(
            **batch, cache=cache, max_new_tokens=cfg.max_new_tokens, streamer=clock,
            pad_token_id=tokenizer.pad_token_id, **options,
        )  # fmt: skip
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    if len(prompts) > 1:
        for text in texts:
            print(text, end="\n\n")
    new_tokens = (output.shape[1] - prompt_length) * output.shape[0]
    decode_seconds = (clock.end_at - clock.first_token_at) if clock.first_token_at else float("nan")
    decode_tokens = (output.shape[1] - prompt_length - 1) * output.shape[0]  # after the first new token
    result = {
        "texts": texts,
        "new_tokens": new_tokens,
        "tokens_per_second": decode_tokens / decode_seconds if decode_seconds > 0 else float("nan"),
        "cache_bytes": cache_bytes(cache),
        "cache": "recurrent state" if converted else "KV cache",
        "positions": output.shape[1],
        "decode_step": _decode_step_used(cache),
    }
    print(
        f"\n[{new_tokens} new tokens, batch {output.shape[0]}, {device.type} {str(dtype).removeprefix('torch.')}: "
        f"{result['tokens_per_second']:.1f} tokens/s decoding; {result['cache']}: "
        f"{result['cache_bytes'] / 2**20:.2f} MiB after {result['positions']} positions; "
        f"decode step: {result['decode_step']}]"
    )
    return result


def _decode_step_used(cache: Any) -> str:
    """How decode steps ran: transformers' forward (softmax), dfw's eager step, or a CUDA graph's replays."""
    if not isinstance(cache, RecurrentCache):
        return "transformers"
    graphs = cache.graphs
    if graphs is None or graphs.replays == 0:
        reason = "cuda_graph=false" if graphs is None else graphs.fallback_reason
        return f"eager ({reason})" if reason else "eager"
    return f"CUDA graph ({graphs.captures} captured, {graphs.replays} replays)"


# `model` is a config group in conf/ (for training, model=gpt2 picks conf/model/gpt2.yaml), so Hydra would
# read `model=<path>` as a group choice. Served from the ConfigStore, whose search path has no such group,
# conf/generate.yaml takes `model=<anything>` as a value.
ConfigStore.instance().store(
    name="generate", node=OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "generate.yaml")
)


@hydra.main(version_base="1.3", config_path=None, config_name="generate")
def main(cfg: DictConfig) -> None:
    run_or_exit(generate, cfg, logger=log)


if __name__ == "__main__":
    main()
