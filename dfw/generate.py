"""Generate text: `python -m dfw.generate model=<exported dir | .ckpt | hub id> prompt="..."`.

Loads the model (see `load_for_generation`), streams the continuation to the terminal, and reports
tokens per second and the memory the cache holds at the end: a converted model decodes with
`dfw.cache.RecurrentCache` (a fixed-size state per layer; on a GPU its decode step is replayed from a
CUDA graph, `cuda_graph=true`), a softmax model with transformers' KV cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import (
    DynamicCache,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    TextStreamer,
    set_seed,
)
from transformers.generation.streamers import BaseStreamer

import dfw  # noqa: F401  (registers the config resolvers)

from .attention import ConvertedAttention
from .cache import RecurrentCache, cache_bytes
from .config import auto_precision
from .errors import ConfigError, run_or_exit
from .loading import load_model
from .presets import config_dir

log = logging.getLogger(__name__)


def load_for_generation(source: str) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """The model and tokenizer that `source` names: an export, a `.ckpt`, a Hugging Face directory or hub id
    (`dfw.loading.load_model`; a softmax model is a plain `GPT2LMHeadModel` with transformers' KV cache, a
    converted one a `DFWForCausalLM`, whose generate supplies a RecurrentCache and runs dfw's decode step)."""
    loaded = load_model(source, option="model")
    return loaded.net, loaded.tokenizer


def is_converted(net: torch.nn.Module) -> bool:
    return any(isinstance(module, ConvertedAttention) for module in net.modules())


class _Clock(BaseStreamer):
    """Times generation from the first new token on (decode speed, without the prompt), optionally
    printing."""

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


GENERATE_CONFIG = config_dir() / "generate.yaml"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_generation_options(cfg: DictConfig) -> None:
    """Every option of conf/generate.yaml checked before anything is loaded: one ConfigError for the first
    one that is wrong (an unknown `+key`, an empty prompt, a number out of its range)."""
    known = set(OmegaConf.load(GENERATE_CONFIG)) - {"defaults", "hydra"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not an option of dfw.generate; its options are {', '.join(sorted(known))}"
        )
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [cfg.prompt]
    if not prompts:
        raise ConfigError("prompt is an empty list; give a string or a list of strings")
    for i, prompt in enumerate(prompts):
        where = f"prompt[{i}]" if isinstance(cfg.prompt, (list, ListConfig)) else "prompt"
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(
                f'{where} is empty; give the text to continue, e.g. prompt="To be, or not to be"'
            )
    if not _is_int(cfg.max_new_tokens) or cfg.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if (
        isinstance(cfg.temperature, bool)
        or not isinstance(cfg.temperature, (int, float))
        or not cfg.temperature >= 0
    ):
        raise ConfigError(f"temperature must be 0 (greedy) or positive, got {cfg.temperature!r}")
    if not _is_int(cfg.top_k) or cfg.top_k < 0:
        raise ConfigError(f"top_k must be a non-negative integer (0: no top-k filtering), got {cfg.top_k!r}")
    if isinstance(cfg.top_p, bool) or not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {cfg.top_p!r}")
    if not _is_int(cfg.seed):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.cuda_graph, bool):
        raise ConfigError(f"cuda_graph must be true or false, got {cfg.cuda_graph!r}")


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Load, generate, print; returns the texts (prompt + continuation) and the measurements."""
    check_generation_options(cfg)
    device, dtype = _device_and_dtype(cfg)
    net, tokenizer = load_for_generation(str(cfg.model))
    net = net.to(device=device, dtype=dtype).eval()
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [str(cfg.prompt)]
    tokenizer.padding_side = "left"  # decoder-only generation: pads before the prompt (see dfw.cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    prompt_length = batch["input_ids"].shape[1]
    if prompt_length >= net.config.n_positions:
        raise ConfigError(
            f"the prompt is {prompt_length} tokens, which leaves none of the model's "
            f"{net.config.n_positions} learned positions for new tokens; shorten it"
        )
    if prompt_length + cfg.max_new_tokens > net.config.n_positions:
        raise ConfigError(
            f"prompt ({prompt_length} tokens) + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"{net.config.n_positions} learned positions; lower max_new_tokens"
        )
    converted = is_converted(net)
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
            **batch,
            cache=cache,
            max_new_tokens=cfg.max_new_tokens,
            streamer=clock,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
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
        "cache": _cache_kind(cache),
        "positions": output.shape[1],
        "decode_step": _decode_step_used(cache),
    }
    print(
        f"\n[{new_tokens} new tokens, batch {output.shape[0]}, {device.type} "
        f"{str(dtype).removeprefix('torch.')}: {result['tokens_per_second']:.1f} tokens/s decoding; "
        f"{result['cache']}: {result['cache_bytes'] / 2**20:.2f} MiB after {result['positions']} positions; "
        f"decode step: {result['decode_step']}]"
    )
    return result


def _cache_kind(cache: Any) -> str:
    """What the cache holds: recurrent states, transformers' KV cache, or both (softmax layers kept)."""
    if not isinstance(cache, RecurrentCache):
        return "KV cache"
    return "recurrent state" if cache.fully_recurrent else "recurrent state + KV cache"


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
ConfigStore.instance().store(name="generate", node=OmegaConf.load(GENERATE_CONFIG))


@hydra.main(version_base="1.3", config_path=None, config_name="generate")
def main(cfg: DictConfig) -> None:
    run_or_exit(generate, cfg, logger=log)


if __name__ == "__main__":
    main()
